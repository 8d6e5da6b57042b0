"""Running the command line in-process, and reading the one-line errors it promises."""

from __future__ import annotations

from click.testing import CliRunner, Result

from bench.cli import main


def invoke(*args: object, input: str | None = None) -> Result:
    """``bench ARGS...`` in this process (arguments converted with ``str``); exceptions are caught into the result."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def one_line_error(result: Result) -> str:
    """The message of a command that failed cleanly: exit status 1, one ``Error:`` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]
