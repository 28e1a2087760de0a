"""What the CLI tests share: invoke the command in-process, and check the one-line error contract."""

from click.testing import CliRunner

from toolkit.cli import cli


def run(*args):
    """`toolkit ARGS...` in-process (arguments converted to strings)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, pattern):
    """Exit status 2 and exactly one line `error: ...` on stderr that contains ``pattern``."""
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]
