"""Several hospital nodes in one process: `murmur hosts --config A.toml --config B.toml ...`.

For simulation only (run_cluster.py --hosts-per-process K); a hospital's deployment keeps one
`murmur node` process per hospital. Each node here is the same `HospitalNode` as there, with
its own key, state directory (locked as `murmur node` locks it), audit log, privacy ledger,
and its own peer and operator listeners on loopback HTTP, so every envelope still goes through
the wire, the request signatures and the receiver. What the nodes share is what a process
has once: the interpreter and torch (about 260 MB, the cost this saves per hospital), the
event loop, the worker threads that train, and the signal handlers (SIGTERM stops every node
of the process, node/lifecycle.py).

The process's log interleaves its nodes' lines, so each line names its node:
`... murmur.node/hospital_3 INFO round 2 done ...`. Each node's task runs in its own context
(asyncio copies it into the node's tasks and worker threads), which is where the name comes
from.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from pathlib import Path

log = logging.getLogger("murmur.node")

HOST_LOG_FORMAT = "%(asctime)s %(name)s/%(node)s %(levelname)s %(message)s"
_NODE_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("murmur_node", default="-")


class _NodeNameFilter(logging.Filter):
    """Adds `node` (the running node's name, "-" outside one) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = _NODE_NAME.get()
        return True


def configure_host_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeNameFilter())
    handler.setFormatter(logging.Formatter(HOST_LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def run_hosts(config_paths: list[Path], *, log_level: str | None) -> int:
    """Run every node of ``config_paths`` in this process until all have stopped; exit status
    0 when every node ended well, 2 when one could not start (its name and why are logged),
    else 1."""
    from murmur.node.checkpoint import CheckpointError
    from murmur.node.config import ConfigError, load_config
    from murmur.node.durable import StateLock, StateLockError
    from murmur.node.node import HospitalNode, StartupError

    configure_host_logging(log_level or "INFO")
    if len({p.resolve() for p in config_paths}) != len(config_paths):
        log.error("cannot start: a config file is named twice")
        return 2
    try:
        configs = [load_config(p) for p in config_paths]
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    with contextlib.ExitStack() as locks:
        nodes = []
        for config in configs:
            token = _NODE_NAME.set(config.node.name)
            try:
                locks.enter_context(StateLock(config.node.state_dir))
                nodes.append(HospitalNode(config))
            except (StartupError, StateLockError, CheckpointError, ValueError, OSError) as exc:
                log.error("cannot start node %s: %s", config.node.name, exc)
                return 2
            finally:
                _NODE_NAME.reset(token)
        return asyncio.run(_run_all(nodes))


async def _run_all(nodes: list) -> int:
    """Each node's whole life (node/lifecycle.py) as one task; a node that fails to start is
    logged and the others go on, as separate processes would."""
    from murmur.node.node import StartupError

    async def one(node) -> int:
        _NODE_NAME.set(node.config.node.name)
        try:
            return await node.run(serve_forever=node.config.node.after_training == "serve")
        except (StartupError, ValueError, OSError) as exc:
            log.error("cannot start node %s: %s", node.config.node.name, exc)
            return 2

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(n), context=contextvars.copy_context()) for n in nodes]
    codes = [t.result() for t in tasks]
    return 0 if all(c == 0 for c in codes) else max(codes)
