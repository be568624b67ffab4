"""`fedfin` as people use it: --version, help for every flag, quiet pipes, one log format."""

import argparse
import logging
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from simulations.cli import _FlowerStyle, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


COMMANDS = sorted(_subcommands(build_parser()))


def test_version_comes_from_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])

    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedfin {version('fedfin')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    parser = _subcommands(build_parser())[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {name}: no help"
        if action.option_strings and action.default not in (None, False):
            shown = parser._get_formatter()._format_action(action)
            assert "default" in shown, f"{command} {name}: default {action.default!r} not shown"
    assert "usage: fedfin" in text


def test_output_into_a_closed_pipe_is_quiet_and_keeps_the_exit_code(tmp_path: Path) -> None:
    """`fedfin ... | head`: the reader leaves early; no BrokenPipeError, the real exit code."""
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "audit", "--help"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # like `head` that has read enough before fedfin writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "BrokenPipe" not in err and "Traceback" not in err and err == ""


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.ERROR])
def test_fedfin_logs_in_flowers_console_format(level: int) -> None:
    from flwr.supercore.logger import ConsoleHandler

    record = logging.LogRecord("fedfin.server", level, "f", 1, "bank-01 failed", (), None)

    line = _FlowerStyle(coloured=False).format(record)

    assert line == ConsoleHandler(colored=False).format(record)
    assert line.startswith(logging.getLevelName(level)) and line.endswith(" bank-01 failed")
