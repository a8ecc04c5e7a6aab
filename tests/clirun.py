"""Running the `gptforge` command in-process, as the tests do."""

from gptforge.cli import main


def run(args, capsys):
    """Run the CLI with args; returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
