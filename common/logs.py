"""fedfin's log lines in Flower's console format, wherever fedfin runs.

A bank's operator reads one log: the CLI's, the bank runner's and the ClientApp's lines
(also inside Ray's simulation workers) look exactly like Flower's own (`INFO :  message`,
with the time after the level where timestamps are on, as Flower prints them), coloured
only on a terminal. The runner, a long-lived service, stamps both its own and Flower's lines.
"""

import logging
import sys
from typing import Any

FEDFIN_LOGGER = "fedfin"
_COLOURS = {
    "DEBUG": "\033[94m",
    "INFO": "\033[92m",
    "WARNING": "\033[93m",
    "ERROR": "\033[91m",
    "CRITICAL": "\033[95m",
}
_RESET = "\033[0m"


class FlowerStyle(logging.Formatter):
    """Flower's console format (flwr.supercore.logger.ConsoleHandler), as a Formatter."""

    def __init__(self, coloured: bool, timestamps: bool = False) -> None:
        super().__init__()
        self.coloured = coloured
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        colour, reset = (_COLOURS.get(level, ""), _RESET) if self.coloured else ("", "")
        separator = " " * (8 - len(level))
        stamp = "%(asctime)s" if self.timestamps else ""
        pattern = f"{colour}%(levelname)s {stamp}{reset}: {separator} %(message)s"
        return logging.Formatter(pattern).format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not when the handler was made."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def log_like_flower(level: int = logging.WARNING, timestamps: bool = False) -> None:
    """Give fedfin's loggers one stderr handler in Flower's format (idempotent).

    Records at `level` and above are shown. With `timestamps`, Flower's own console handler
    is switched to timestamps too, so both kinds of line carry the time.
    """
    logger = logging.getLogger(FEDFIN_LOGGER)
    if level < logging.WARNING and (logger.level == logging.NOTSET or logger.level > level):
        logger.setLevel(level)  # below WARNING, Python's default, fedfin must ask for it
    coloured = sys.stderr.isatty()
    handler = next((h for h in logger.handlers if isinstance(h.formatter, FlowerStyle)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setLevel(level)
    handler.setFormatter(FlowerStyle(coloured=coloured, timestamps=timestamps))
    if timestamps:
        from flwr.common.logger import update_console_handler

        update_console_handler(timestamps=True, colored=coloured)


def log_like_flower_unless_configured() -> None:
    """For code that runs where fedfin's CLI did not start the process (Ray workers, a
    SuperNode's ClientApp process): warnings in Flower's format, unless someone set a
    handler already."""
    if not logging.getLogger(FEDFIN_LOGGER).handlers:
        log_like_flower(logging.WARNING)
