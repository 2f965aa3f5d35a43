"""``cnndiff`` run in the test process (importable as ``cli_run``): what a CLI test sees without a subprocess."""

from __future__ import annotations

import contextlib
import io

from cnndiff_xr import cli


def main_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``cnndiff ARGV`` in this process: exit code (argparse's SystemExit included), stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
