"""The error every configuration problem raises, and the checks the sections share.

Each check phrases its failure for the operator: which field, what is wrong, and the fix.
"""

from __future__ import annotations

import difflib
import ipaddress
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, phrased for the operator: which field, what is wrong, the fix."""


def split_listen(listen: str, where: str = "node.listen") -> tuple[str, int]:
    """'127.0.0.1:8700' -> ('127.0.0.1', 8700), with a config-phrased error naming `where`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f'{where} {listen!r} must be HOST:PORT, e.g. listen = "127.0.0.1:8700"')
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether binding `host` only accepts connections from this machine.

    "localhost" counts (it resolves to loopback on every sane system); any other name, an
    empty host and the wildcards 0.0.0.0 / :: do not.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, where: str, example: str) -> tuple[str, int]:
    host, port = split_listen(listen, where)
    require(0 <= port <= 65535, where, "port must be 0..65535", f'listen = "{example}"')
    require(host != "", where, "needs a host", f'listen = "{example}"')
    return host, port


def expect(ok: bool, where: str, value: Any, wanted: str) -> None:
    if not ok:
        raise ConfigError(
            f"{where} must be {wanted} (got {value!r} of type {type(value).__name__})"
        )


def require(ok: bool, where: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{where} {problem}; fix: {fix}")


def did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
