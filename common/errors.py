"""Errors are part of fedfin's interface: each kind has its own type and exit code.

The command line turns any `FedfinError` into one line on stderr and its exit code,
never a traceback.
"""


class FedfinError(Exception):
    """Base of every error fedfin reports to a person."""

    exit_code = 1


class DataError(FedfinError):
    """A data file or table is missing, unreadable or does not fit the schema."""

    exit_code = 2


class ConfigError(FedfinError):
    """A flag, run config or node config value is invalid."""

    exit_code = 2


class CheckpointError(FedfinError):
    """A checkpoint, schema or state file is missing, corrupt or from another model."""

    exit_code = 3


class PrivacyBudgetError(FedfinError):
    """A release would exceed, or a record shows an excess of, a bank's privacy budget."""

    exit_code = 4


class LedgerError(FedfinError):
    """A privacy ledger is unreadable or its hash chain is broken."""

    exit_code = 5
