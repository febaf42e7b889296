"""The node's log: stderr always, and a size-rotated file when `[logging] file` is set.

A hospital's node runs for weeks under a service manager; its operator reads the log file,
not a terminal, and a log that grows without bound fills the disk the audit log lives on.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from murmur.node.config import LoggingSection

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging(settings: LoggingSection, level: str | None = None) -> None:
    """Log to stderr and, if configured, to a rotating file (`level` overrides the config's)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                settings.file,
                maxBytes=int(settings.max_mb * 1024 * 1024),
                backupCount=settings.backups,
                encoding="utf-8",
            )
        )
    logging.basicConfig(
        level=level or settings.level, format=LOG_FORMAT, handlers=handlers, force=True
    )
