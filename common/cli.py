"""The one command-line error handler of every entry point (``python -m shard_builder``,
``python -m trainer.train`` / ``.evaluate`` / ``.predict``):

    def main(argv=None) -> int:
        return cli.run(lambda: do_the_work(parse(argv)))

A :class:`~common.errors.UserError` becomes one line ``error: <what is wrong and what to
do>`` on stderr and its exit code (common.errors); anything else propagates (a traceback).
"""
from __future__ import annotations

import sys
from typing import Callable

from common.errors import UserError


def run(fn: Callable[[], int | None], *, on_error: Callable[[UserError], None] | None = None,
        interrupted: str | None = None) -> int:
    """``fn()``'s exit code (None = 0), or a UserError's: printed as one line, then passed to
    ``on_error`` (e.g. to record the exit status). With ``interrupted`` (a hint such as "rerun
    to resume"), Ctrl-C prints ``interrupted: <hint>`` and exits 130 instead of a traceback."""
    try:
        return int(fn() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if on_error is not None:
            on_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
