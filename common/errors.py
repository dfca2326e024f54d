"""Errors a user can act on, and the exit codes every entry point uses (one home for both).

Exit codes (``scripts/ec2/train-loop.sh`` relies on them; keep the two in step):

==== ================== ==============================================================
code name               meaning / what the restart loop does
==== ================== ==============================================================
0    EXIT_COMPLETED     finished; do not rerun
1    EXIT_FAILURE       unexpected failure (a traceback is logged); retried with backoff
2    EXIT_USAGE         bad input or environment (one-line message; e.g. another live
                        writer holds the run's lease); the loop retries with backoff,
                        then powers off after --max-failures
75   EXIT_INTERRUPTED   stopped on purpose (SIGTERM / spot notice), checkpoint saved and
                        uploaded (EX_TEMPFAIL); rerun to resume at the exact step
76   EXIT_HUNG          the hang watchdog fired: no progress within the timeout; thread
                        stacks are in the log; retryable (resumes from the last checkpoint)
77   EXIT_LEASE_LOST    another writer took over this run folder / destination (its lease);
                        this process stopped writing; the loop does not retry
                        (status object, poweroff)
==== ================== ==============================================================
"""
from __future__ import annotations

EXIT_COMPLETED = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL from sysexits.h: "temporary failure, try again later"
EXIT_HUNG = 76
EXIT_LEASE_LOST = 77


class UserError(Exception):
    """Bad input or environment. The message says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class PreconditionFailed(Exception):
    """A conditional write lost: the object already exists (create) or changed (replace)."""
