"""Logging set-up shared by the CLIs: one file handler plus a terse console handler.

Secrets never reach the log: messages are built from paths, counts and URLs only, and
:class:`RedactFilter` masks anything that looks like an AWS secret or Kaggle key as a
second line of defence.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

_SECRET_RE = re.compile(r"(?i)(aws_secret_access_key|secret|kaggle_key|password|token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',]+")


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "KAGGLE_KEY"):
            value = os.environ.get(name)
            if value and len(value) >= 8 and value in msg:
                msg = msg.replace(value, "***")
        record.msg, record.args = _SECRET_RE.sub(r"\1\2***", msg), None
        return True


class SafeFileHandler(logging.FileHandler):
    """A log file that cannot take the program down: on a write error (disk full) it says so
    once on stderr and stops writing, instead of printing a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's API
        if self.stream is not None:
            print(f"warning: cannot write log file {self.baseFilename} any more; logging to the console only",
                  file=sys.stderr)
            try:
                self.close()
            except OSError:
                pass
            self.stream = None
        self.emit = lambda record: None  # type: ignore[method-assign]


def setup_logging(name: str, log_file: str | Path | None = None, console_level: int = logging.INFO) -> logging.Logger:
    """Configure the ``name`` logger: console (stderr) and, if given, a log file (DEBUG)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(RedactFilter())
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = SafeFileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh.addFilter(RedactFilter())
        logger.addHandler(fh)
    return logger
