"""The privacy-utility map's quick path: it runs end to end, resumes, and reports every cell."""

import json
from pathlib import Path

from benchmarks import privacy_utility_map as pum


def test_quick_map_writes_every_cell_with_paired_gains_and_a_headline(tmp_path: Path) -> None:
    assert pum.main(["--quick", "--out", str(tmp_path), "--map-seeds", "0", "1"]) == 0

    result = json.loads((tmp_path / "privacy_utility_map.json").read_text())
    cells = {(c["rows"], c["banks"]) for c in result["cells"]}
    assert cells == {(c.rows, c.banks) for c in pum.QUICK_CELLS}
    assert {(r["seed"], r["rows"], r["banks"]) for r in result["records"]} == {
        (seed, rows, banks) for seed in (0, 1) for rows, banks in cells
    }
    for record in result["records"]:
        methods = {(r["method"], r["epsilon"]) for r in record["per_bank"]}
        for column in record["columns"]:
            assert ("d_fedfin", column) in methods and ("c_alone", column) in methods
        assert {"a_public", "hgb_alone", "f_pooled"} <= {m for m, _ in methods}
        assert len({r["bank"] for r in record["per_bank"]}) == record["banks"]
        for row in record["per_bank"]:
            if row["method"] in ("d_fedfin", "c_alone") and row["epsilon"] != pum.NON_PRIVATE:
                assert 0 < row["epsilon_spent"] <= float(row["epsilon"]) + 1e-9
    for entry in result["summary"]:
        fedfin = entry["methods"]["d_fedfin"]
        assert {"auc", "auc_ci", "gain", "gain_ci", "worst_auc", "worst_gain"} <= set(fedfin)
        assert entry["methods"]["a_public"]["gain"] == 0.0
    for key in ("environment", "command", "started", "recipe_by_size", "compute_seconds"):
        assert key in result

    report = (tmp_path / "privacy_utility_map.md").read_text()
    assert "federation pays" in report and "fedfin − public" in report
    assert (tmp_path / pum.PLOT_NAME).stat().st_size > 0


def test_a_stopped_map_resumes_without_redoing_finished_cells(tmp_path: Path) -> None:
    first = pum.QUICK_CELLS[0].key
    pum.main(["--quick", "--out", str(tmp_path), "--map-seeds", "0", "--cells", first])
    path = tmp_path / "privacy_utility_map.json"
    done = json.loads(path.read_text())["records"]

    pum.main(["--quick", "--out", str(tmp_path), "--map-seeds", "0"])
    records = json.loads(path.read_text())["records"]
    assert records[: len(done)] == done  # kept as they were, not recomputed
    assert {(r["rows"], r["banks"]) for r in records} == {
        (c.rows, c.banks) for c in pum.QUICK_CELLS
    }
