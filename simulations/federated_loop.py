"""An in-process federation loop for benchmarks: the banks' own code, FedAvg's maths, no transport.

Each round every bank runs `client.bank_worker.train_round` (DP-SGD, budget, ledger) on the
global encoder, and the server takes the weighted mean Flower's FedAvg computes
(`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`), weighted as
`server/federation.py` weights: by released `num-examples`, uniformly when any bank withholds
it. After the last round each bank runs `bank_worker.evaluate_round`. Ray, messages and
per-round evaluation are left out, so a 5-bank, 5-round run takes seconds instead of a minute;
the utility numbers come from the same bank code and the same aggregation.

Two things exist only here, as baselines, never in the production client:
- `sharing="model"`: FedAvg of encoder *and* head. Each bank's head (in its state dir) is
  replaced by the averaged head after every round. Sharing heads is what fedfin forbids.
- `private=False`: the same model, data, start, steps and optimiser without clipping or
  noise, for the "non-private" column of the benchmarks.
"""

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedfin.client.bank_data import load_bank_data
from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.client.bank_worker import BankReply, bank_model, evaluate_round, train_round
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import TrainPlanConfig
from fedfin.common.errors import PrivacyBudgetError
from fedfin.common.model import build_model
from fedfin.common.protocol import NUM_EXAMPLES, RoundInstructions
from fedfin.common.shared_weights import shared_arrays
from fedfin.common.tensors import as_dataset

Sharing = Literal["encoder", "model", "none"]
SHARINGS: tuple[Sharing, ...] = ("encoder", "model", "none")
HEAD_PREFIX = "head."  # keys of head arrays in a whole-model upload ("model" sharing only)
Arrays = OrderedDict[str, np.ndarray]


@dataclass(frozen=True)
class LoopConfig:
    """One benchmark federation: what is shared, and whether training is private."""

    rounds: int = 5
    plan: TrainPlanConfig = field(default_factory=TrainPlanConfig)
    sharing: Sharing = "encoder"  # encoder: fedfin; model: whole-model FedAvg; none: alone
    private: bool = True
    min_banks: int = 2  # as FederationConfig: fewer accepted banks leave the model unchanged
    run_id: int = 1


@dataclass(frozen=True)
class Upload:
    """What one bank sent the server in one round (arrays only; numbers are in `metrics`)."""

    bank: str
    server_round: int
    arrays: Arrays
    metrics: dict[str, float | int]


@dataclass(frozen=True)
class LoopResult:
    """Each bank's final test metrics (with ε spent), and the rounds each bank declined."""

    per_bank: dict[str, dict[str, float]]
    declined: dict[str, list[int]]


def fedavg(uploads: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    """Flower FedAvg's weighted mean, in its order of operations and dtype (float32 in, out)."""
    total = sum(weights)
    out: Arrays = OrderedDict()
    for arrays, weight in zip(uploads, weights, strict=True):
        factor = weight / total
        for key, value in arrays.items():
            if key in out:
                out[key] += value * factor
            else:
                out[key] = value * factor
    return out


def aggregation_weights(metrics: Sequence[Mapping[str, float | int]]) -> list[float]:
    """As the server sets them: released example counts, or 1 each if any bank withholds one."""
    counts = [m.get(NUM_EXAMPLES) for m in metrics]
    if any(c is None or float(c) <= 0 for c in counts):
        return [1.0] * len(counts)
    return [float(c) for c in counts]  # type: ignore[arg-type]


def run_federated_loop(
    banks: Sequence[BankSettings],
    start: EncoderCheckpoint,
    source_head: Mapping[str, np.ndarray] | None,
    config: LoopConfig,
    initial_encoder: Mapping[str, np.ndarray] | None = None,
    on_upload: Callable[[Upload], None] | None = None,
) -> LoopResult:
    """Run `config.rounds` rounds over banks with fresh state dirs; evaluate once at the end.

    `initial_encoder` replaces the pretrained encoder (e.g. a random one: from scratch).
    """
    global_encoder: Arrays = OrderedDict(initial_encoder or start.arrays)
    encoders = {bank.name: global_encoder for bank in banks}  # "none": each bank's own
    declined: dict[str, list[int]] = {bank.name: [] for bank in banks}
    for server_round in range(1, config.rounds + 1):
        instructions = RoundInstructions(
            server_round, config.rounds, config.plan, start.schema, start.model_config
        )
        uploads: list[Upload] = []
        for bank in banks:
            received = encoders[bank.name] if config.sharing == "none" else global_encoder
            try:
                reply = _train(bank, instructions, received, source_head, config)
            except PrivacyBudgetError:
                declined[bank.name].append(server_round)
                continue
            arrays = OrderedDict(reply.arrays)
            if config.sharing == "model":
                arrays.update(_head_arrays(bank, start))
            upload = Upload(bank.name, server_round, arrays, dict(reply.metrics))
            if on_upload is not None:
                on_upload(upload)
            uploads.append(upload)
        if config.sharing == "none":
            for upload in uploads:
                encoders[upload.bank] = upload.arrays
            continue
        if len(uploads) < config.min_banks:
            continue  # as the server: too few banks, the model stays as it was
        weights = aggregation_weights([u.metrics for u in uploads])
        averaged = fedavg([u.arrays for u in uploads], weights)
        global_encoder = OrderedDict((k, v) for k, v in averaged.items() if k in start.arrays)
        if config.sharing == "model":
            head = OrderedDict(
                (k.removeprefix(HEAD_PREFIX), v)
                for k, v in averaged.items()
                if k not in start.arrays
            )
            for bank in banks:
                _install_head(bank, start, head)

    last = RoundInstructions(
        config.rounds, config.rounds, config.plan, start.schema, start.model_config
    )
    per_bank = {}
    for bank in banks:
        encoder = encoders[bank.name] if config.sharing == "none" else global_encoder
        reply = evaluate_round(bank, last, encoder, config.run_id)
        # Each bank reads its own exact report: nothing crosses the federation here.
        exact = BankState(bank.state_dir).evaluations()[-1]["metrics"]
        per_bank[bank.name] = {
            **{k: float("nan") if v is None else float(v) for k, v in exact.items()},
            **{k: float(v) for k, v in reply.metrics.items()},
        }
    return LoopResult(per_bank, declined)


def _train(
    bank: BankSettings,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    source_head: Mapping[str, np.ndarray] | None,
    config: LoopConfig,
) -> BankReply:
    if config.private:
        return train_round(bank, instructions, encoder, source_head, config.run_id)
    return train_round_without_dp(bank, instructions, encoder, source_head)


def train_round_without_dp(
    settings: BankSettings,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    source_head: Mapping[str, np.ndarray] | None,
) -> BankReply:
    """The non-private reference for `train_round`: same data, model, start, step count, batch
    size and Adam, but shuffled batches and plain gradients (no clipping, no noise, no ledger).
    """
    state = BankState(settings.state_dir)
    train, _ = load_bank_data(
        settings.data_path,
        instructions.schema,
        settings.test_fraction,
        state.split_key(),
        settings.validation_fraction,
    )
    model = bank_model(settings, state, instructions, encoder, source_head)
    plan = instructions.plan
    rows = len(train.numeric)
    q = settings.policy.sample_rate  # the step counts of client/budget.py
    batch_size = max(1, round(q * rows))
    steps = max(1, math.ceil(min(plan.local_epochs, settings.policy.max_local_epochs) / q - 1e-9))
    if plan.mode == "fedsgd":
        steps = 1
    head_steps = (
        math.ceil(min(plan.head_epochs, settings.policy.max_local_epochs) / q - 1e-9)
        if plan.mode == "fedrep"
        else 0
    )
    phases: list[tuple[nn.Module, int]] = (
        [(model.head, head_steps), (model.encoder, steps)]
        if plan.mode == "fedrep"
        else [(model.encoder, steps)]
        if plan.mode == "fedsgd"
        else [(model, steps)]
    )
    generator = torch.Generator().manual_seed(
        hash((settings.seed, instructions.server_round)) % 2**31
    )
    loader = DataLoader(as_dataset(train), batch_size=batch_size, shuffle=True, generator=generator)
    batches = _forever(loader)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for trainable, count in phases:
        wanted = {id(p) for p in trainable.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in wanted)
        optimizer = (
            torch.optim.SGD(trainable.parameters(), lr=plan.learning_rate)
            if plan.mode == "fedsgd"
            else torch.optim.Adam(trainable.parameters(), lr=plan.learning_rate)
        )
        for _ in range(count):
            numeric, categorical, target = next(batches)
            optimizer.zero_grad()
            loss_fn(model(numeric, categorical), target).backward()
            optimizer.step()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    state.save_head(model, instructions.schema.fingerprint)
    metrics: dict[str, float | int] = {}
    if settings.policy.release_num_examples:
        metrics[NUM_EXAMPLES] = rows
    return BankReply(arrays=shared_arrays(model), metrics=metrics)


def _head_arrays(bank: BankSettings, start: EncoderCheckpoint) -> Arrays:
    """The bank's head from its state dir, keyed for a whole-model upload."""
    model = build_model(start.schema, start.model_config, seed=bank.seed)
    BankState(bank.state_dir).load_head(model, start.schema.fingerprint)
    return OrderedDict(
        (HEAD_PREFIX + k, v.detach().numpy().copy()) for k, v in model.head.state_dict().items()
    )


def _install_head(
    bank: BankSettings, start: EncoderCheckpoint, head: Mapping[str, np.ndarray]
) -> None:
    """Overwrite the bank's head with the averaged one (whole-model FedAvg only)."""
    model = build_model(start.schema, start.model_config, seed=bank.seed)
    model.head.load_state_dict(_tensors(head))
    BankState(bank.state_dir).save_head(model, start.schema.fingerprint)


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in arrays.items()}


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader
