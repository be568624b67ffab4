"""Give each virtual SuperNode of a simulation the settings a real bank's node config would.

Flower's simulation engine gives virtual SuperNodes only `partition-id`; here each
partition gets its own data directory, state directory and privacy policy, laid out under
the run directory exactly as a bank would have them on its own machine.
"""

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedfin.client.bank_settings import BankSettings
from fedfin.common.config import PrivacyPolicy
from fedfin.common.errors import ConfigError
from fedfin.common.partition import FederatedSplit

BANKS_DIR = "banks"


@dataclass(frozen=True)
class SimulatedBanks:
    """partition-id -> that bank's settings; picklable, so Ray workers can receive it."""

    banks: tuple[BankSettings, ...]

    def __call__(self, context: Context) -> BankSettings:
        try:
            partition = int(context.node_config["partition-id"])
            return self.banks[partition]
        except (KeyError, IndexError, ValueError):
            raise ConfigError(
                f"no simulated bank for node config {dict(context.node_config)}"
            ) from None


def lay_out_banks(split: FederatedSplit, run_dir: Path, policy: PrivacyPolicy) -> SimulatedBanks:
    """Write each bank's train/test tables under run_dir/banks/<bank>/data (once)."""
    settings = []
    for bank in split.banks:
        bank_dir = run_dir / BANKS_DIR / bank.name
        data_dir = bank_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, frame in (("train", bank.train), ("test", bank.test)):
            path = data_dir / f"{name}.parquet"
            if not path.exists():
                frame.to_parquet(path, index=False)
        settings.append(
            BankSettings(
                name=bank.name, data_path=data_dir, state_dir=bank_dir / "state", policy=policy
            )
        )
    return SimulatedBanks(tuple(settings))

