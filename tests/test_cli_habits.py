"""`fedfin` as people use it: --version, help for every flag, quiet pipes, one log format."""

import argparse
import logging
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from fedfin.common.logs import FlowerStyle, log_like_flower
from fedfin.simulations.cli import build_parser, main

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
        [sys.executable, "-m", "fedfin.simulations.cli", "audit", "--help"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # like `head` that has read enough before fedfin writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "BrokenPipe" not in err and "Traceback" not in err and err == ""


@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("coloured", [False, True])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.ERROR])
def test_fedfin_logs_in_flowers_console_format(
    level: int, coloured: bool, timestamps: bool
) -> None:
    from flwr.supercore.logger import ConsoleHandler

    record = logging.LogRecord("fedfin.server", level, "f", 1, "bank-01 failed", (), None)

    line = FlowerStyle(coloured=coloured, timestamps=timestamps).format(record)

    flower = ConsoleHandler(colored=coloured, timestamps=timestamps).format(record)
    assert line == flower
    assert line.endswith(" bank-01 failed") and logging.getLevelName(level) in line


def test_the_runners_log_stamps_fedfins_and_flowers_lines_alike(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bank runner (a service) logs once, in one format, with the time on every line."""
    from flwr.common.logger import FLOWER_LOGGER, update_console_handler

    logger = logging.getLogger("fedfin")
    before = (logger.level, list(logger.handlers))
    try:
        log_like_flower(logging.INFO, timestamps=True)
        log_like_flower(logging.INFO, timestamps=True)  # twice: still one handler
        assert sum(isinstance(h.formatter, FlowerStyle) for h in logger.handlers) == 1
        logging.getLogger("fedfin.runner").info("runner line")
        record = logging.LogRecord("flwr", logging.INFO, "f", 1, "flower line", (), None)
        flower_handlers = [h for h in FLOWER_LOGGER.handlers if hasattr(h, "timestamps")]
        assert flower_handlers and all(h.timestamps for h in flower_handlers)
        flower_line = flower_handlers[0].format(record)
        ours = capsys.readouterr().err.strip().splitlines()[-1]
        stamp = r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}:\s+"
        assert re.fullmatch(stamp + "runner line", ours), ours
        assert re.fullmatch(stamp + "flower line", flower_line), flower_line
    finally:
        update_console_handler(timestamps=False)
        logger.setLevel(before[0])
        logger.handlers[:] = before[1]
