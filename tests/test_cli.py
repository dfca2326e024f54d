"""common.cli: the one error handler every entry point uses."""
from __future__ import annotations

import pytest

from common import cli
from common.errors import EXIT_LEASE_LOST, UserError


def test_user_error_is_one_line_on_stderr_with_its_exit_code(capsys):
    seen = []

    def fail():
        raise UserError("bad --thing: pass a good one", exit_code=EXIT_LEASE_LOST)

    assert cli.run(fail, on_error=seen.append) == EXIT_LEASE_LOST
    assert capsys.readouterr().err == "error: bad --thing: pass a good one\n"
    assert [str(e) for e in seen] == ["bad --thing: pass a good one"]
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 3) == 3


def test_other_errors_and_ctrl_c_keep_their_traceback_unless_a_hint_is_given(capsys):
    def boom():
        raise RuntimeError("bug")

    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(RuntimeError):
        cli.run(boom)
    with pytest.raises(KeyboardInterrupt):
        cli.run(ctrl_c)
    assert cli.run(ctrl_c, interrupted="rerun to resume") == 130
    assert capsys.readouterr().err == "interrupted: rerun to resume\n"
