"""What a bank can do without federation, through the very same DP code path and budget.

`train_alone` runs `bank_worker.train_round` round after round on one bank, feeding its
own encoder back to itself: no server, no other bank. From a random encoder it is "each
bank alone, DP from scratch"; from the public encoder it is "transfer without federation".
"""

import tempfile
from dataclasses import replace
from pathlib import Path

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_worker import evaluate_round, train_round
from fedfin.common.checkpoint import EncoderCheckpoint, load_source_head
from fedfin.common.config import TrainPlanConfig
from fedfin.common.errors import PrivacyBudgetError
from fedfin.common.model import build_model
from fedfin.common.protocol import RoundInstructions
from fedfin.common.shared_weights import shared_arrays


def train_alone(
    bank: BankSettings,
    start: EncoderCheckpoint,
    encoder_dir: Path,
    rounds: int,
    plan: TrainPlanConfig,
    from_scratch: bool,
    seed: int = 0,
) -> dict[str, float]:
    """Test metrics of one bank training alone with DP for `rounds` rounds (fresh state dir)."""
    with tempfile.TemporaryDirectory(prefix=f"fedfin-alone-{bank.name}-") as state:
        settings = replace(bank, state_dir=Path(state), seed=seed)
        if from_scratch:
            encoder = shared_arrays(build_model(start.schema, start.model_config, seed=seed))
            head = None
        else:
            encoder, head = start.arrays, load_source_head(encoder_dir)
        for server_round in range(1, rounds + 1):
            instructions = RoundInstructions(
                server_round, rounds, plan, start.schema, start.model_config
            )
            try:
                reply = train_round(settings, instructions, encoder, head, run_id=1)
            except PrivacyBudgetError:
                break
            encoder = reply.arrays
        last = RoundInstructions(rounds, rounds, plan, start.schema, start.model_config)
        metrics = evaluate_round(settings, last, encoder, run_id=1).metrics
        return {k: float(v) for k, v in metrics.items()}
