"""Real Flower simulation (Ray) + real Opacus, 3 banks x 2 rounds: what leaves a bank, and ε."""

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import PRVAccountant

from fedfin.common.accounting import epsilon_spent
from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.ledger import PrivacyLedger, events_of
from fedfin.common.protocol import ALLOWED_EVAL_METRICS, ALLOWED_TRAIN_METRICS
from tests.harness.processes import flower_env, run_to_end

BANKS, ROUNDS, EPSILON = 3, 2, 1.0


def _simulate(tmp: Path, out: Path, record: Path, rounds: int, epsilon: float) -> None:
    log = tmp / f"simulation-{len(list(tmp.glob('simulation-*.log')))}.log"
    command = [
        sys.executable,
        "-m",
        "tests.harness.recorded_simulation",
        str(out),
        str(record),
        str(BANKS),
        str(rounds),
        str(epsilon),
        "full",
    ]
    code = run_to_end(command, flower_env(tmp / "flwr-home"), log, timeout=300)
    assert code == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("federation")
    out, record = tmp / "run", tmp / "replies"
    _simulate(tmp, out, record, ROUNDS, EPSILON)
    replies = [
        {**json.loads(path.read_text()), "arrays": dict(np.load(path.with_suffix(".npz")))}
        for path in sorted(record.glob("*.json"))
    ]
    return {
        "tmp": tmp,
        "out": out,
        "record": record,
        "replies": replies,
        "report": json.loads((out / "report.json").read_text()),
    }


def _state_dirs(out: Path) -> list[Path]:
    return sorted(out.glob("banks/*/state"))


def test_every_bank_replied_to_every_train_and_evaluate_message(run: dict[str, Any]) -> None:
    kinds = sorted((r["type"], r["round"], r["partition"]) for r in run["replies"])
    expected = sorted(
        (kind, rnd, bank)
        for kind in ("train", "evaluate")
        for rnd in range(1, ROUNDS + 1)
        for bank in range(BANKS)
    )
    assert kinds == expected


def test_replies_carry_only_encoder_arrays_and_allowed_metadata(run: dict[str, Any]) -> None:
    encoder_keys = list(load_encoder_checkpoint(run["out"] / "pretrained").arrays)
    for reply in run["replies"]:
        assert reply["config_records"]["status"]["status"] == "ok"
        if reply["type"] == "train":
            assert reply["records"] == ["arrays", "metrics", "status"]
            assert reply["array_records"] == {"arrays": encoder_keys}
            assert set(reply["metric_records"]["metrics"]) <= ALLOWED_TRAIN_METRICS
        else:
            assert reply["records"] == ["metrics", "status"]
            assert set(reply["metric_records"]["metrics"]) <= ALLOWED_EVAL_METRICS
        # By default a bank sends ε and nothing else; its status anchors its ledger.
        assert set(reply["metric_records"]["metrics"]) == {"epsilon"}
        assert set(reply["config_records"]["status"]) == {
            "status",
            "bank",
            "ledger-seq",
            "ledger-head",
        }


def test_private_heads_stay_on_disk_and_never_appear_in_a_message(run: dict[str, Any]) -> None:
    states = _state_dirs(run["out"])
    assert len(states) == BANKS
    heads = []
    for state in states:
        with np.load(state / "head.npz") as npz:
            heads += [npz[key] for key in npz.files]
    sent = [array for reply in run["replies"] for array in reply["arrays"].values()]
    assert sent, "no arrays were recorded"
    for head in heads:
        for array in sent:
            assert not (array.shape == head.shape and np.allclose(array, head))
    assert not any("head" in key for r in run["replies"] for key in r["arrays"])


def test_global_encoder_changes_every_round(run: dict[str, Any]) -> None:
    rounds = [
        load_encoder_checkpoint(run["out"] / "global" / f"round-{r:03d}").arrays
        for r in range(ROUNDS + 1)
    ]
    for before, after in itertools.pairwise(rounds):
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    final = load_encoder_checkpoint(run["out"] / "final").arrays
    assert all(np.array_equal(final[k], rounds[-1][k]) for k in final)


def test_epsilon_equals_independent_recomputation_from_the_ledger(run: dict[str, Any]) -> None:
    for state in _state_dirs(run["out"]):
        entries = PrivacyLedger(state).entries()
        trains = [e for e in entries if e["kind"] == "train"]
        assert len(trains) == ROUNDS
        history = [event.as_history() for e in entries for event in events_of(e)]
        accountant = PRVAccountant()
        accountant.history = history  # unmerged, straight from the records
        independent = accountant.get_epsilon(delta=trains[-1]["delta"])
        assert trains[-1]["epsilon_cumulative"] == pytest.approx(independent, rel=0.02)
        assert trains[-1]["epsilon_cumulative"] <= EPSILON
        assert trains[0]["epsilon_cumulative"] < trains[1]["epsilon_cumulative"]


def test_round_metrics_take_the_largest_epsilon_not_the_mean(run: dict[str, Any]) -> None:
    for summary in run["report"]["rounds"]:
        epsilons = [bank["epsilon"] for bank in summary["per_bank"].values()]
        assert summary["max_epsilon"] == max(epsilons)
        aucs = [bank["auc"] for bank in summary["per_bank"].values()]
        assert summary["worst_bank_auc"] == min(aucs)
        assert summary["mean_auc"] == pytest.approx(np.mean(aucs))
        assert summary["weighted_mean_auc"] is not None


def test_report_has_before_and_after_per_bank(run: dict[str, Any]) -> None:
    report = run["report"]
    assert report["banks"] == BANKS and len(report["rounds"]) == ROUNDS
    for bank in report["per_bank"].values():
        assert 0.5 < bank["auc_public_model"] < 1 and 0.5 < bank["auc_federated"] < 1
        assert 0 < bank["epsilon_spent"] <= bank["epsilon_budget"] == EPSILON


def test_second_run_with_the_same_state_dirs_continues_each_banks_epsilon(
    run: dict[str, Any],
) -> None:
    first = {
        s: PrivacyLedger(s).entries()[-1]["epsilon_cumulative"] for s in _state_dirs(run["out"])
    }
    # The banks raise their own budget (a bank policy, not the server's) and join one more round.
    _simulate(run["tmp"], run["out"], run["tmp"] / "replies-2", 1, 2 * EPSILON)
    for state, before in first.items():
        entries = PrivacyLedger(state).entries()
        last_train = [e for e in entries if e["kind"] == "train"][-1]
        assert len({e["run_id"] for e in entries}) == 2
        assert last_train["epsilon_cumulative"] > before  # continued, not restarted near 0.75
        assert last_train["epsilon_cumulative"] <= 2 * EPSILON
        all_events = [ev for e in entries for ev in events_of(e)]
        assert last_train["epsilon_cumulative"] == pytest.approx(
            epsilon_spent(all_events, last_train["delta"]), rel=1e-6
        )
