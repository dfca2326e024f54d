"""Errors a user can act on: printed as one line by the CLIs, never as a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or environment. The message says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
