"""The cross-validation summary rows and the side-by-side model comparison, on hand-written run
results (no training): every number checked against a value computed by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import crossval

ROOT = Path(__file__).resolve().parents[1]


def _relaxation(setting, mean_dq, start, converged, basin, n=2, diverged=0):
    return {"setting": setting, "mean_dq": mean_dq, "mean_dq_initial": start, "num_converged": converged,
            "num_structures": n, "num_diverged": diverged, "basin_0.1": basin}


def _base(start_per, grid_per, fire_per, force_rmse=0.2, zero=0.8, fire=True):
    rows = [_relaxation("pretrained, best grid step 0.04", sum(grid_per) / 2, sum(start_per) / 2, 2, 0.5)]
    if fire:
        rows.insert(0, _relaxation("pretrained + FIRE", sum(fire_per) / 2, sum(start_per) / 2, 1, 0.0))
    per = {"start": start_per, "pretrained_best_grid": grid_per, "bptt": grid_per}
    if fire:
        per["pretrained_fire"] = fire_per
    return {"relaxation": rows, "best_grid_step": 0.04, "timings_s": {"total_s": 100.0},
            "forces": {"pretrained": {"force_rmse": force_rmse, "zero_force_rmse": zero}},
            "per_structure_test_dq": per}


def _tuned(bptt_per, force_rmse=0.3, pretrained_dq=3.0, fire_dq=None):
    """A variant's results: the pretrained model's row under the same relaxer (best grid step, or FIRE
    with ``fire_dq``), then the tuned model's."""
    same = (_relaxation("pretrained, best grid step 0.04", pretrained_dq, 10.0, 2, 0.5) if fire_dq is None
            else _relaxation("pretrained + FIRE", fire_dq, 10.0, 2, 0.5))
    return {"relaxation": [same, _relaxation("BPTT (fixed step)", sum(bptt_per) / 2, 10.0, 2, 1.0)],
            "timings_s": {"total_s": 50.0}, "forces": {"bptt": {"force_rmse": force_rmse}},
            "per_structure_test_dq": {"pretrained_best_grid": [0, 0], "bptt": bptt_per}}


def test_fold_row_against_hand_computed_ratios():
    base = _base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0])
    row = crossval.fold_row(base, _tuned([2.0, 1.0]))
    assert row["start_dq"] == 8.0 and row["pretrained_dq"] == 3.0 and row["fire_dq"] == 4.0
    assert row["dq"] == 1.5 and row["dq_ratio"] == pytest.approx(0.5) and row["dq_over_start"] == pytest.approx(1.5 / 8)
    assert row["force_ratio"] == pytest.approx(1.5) and row["pretrained_force_over_zero"] == pytest.approx(0.25)
    assert row["fire_converged"] == 1 and row["pretrained_converged"] == 2 and row["basin_0.1"] == 1.0
    fire_relaxer = crossval.fold_row(base, _tuned([2.0, 1.0], fire_dq=6.0))  # --relaxer=fire: ratio to FIRE
    assert fire_relaxer["dq_ratio"] == pytest.approx(0.25) and fire_relaxer["ratio_of"] == "pretrained + FIRE"
    no_fire = crossval.reference_row(_base([10.0, 6.0], [4.0, 2.0], None, fire=False))
    assert math.isnan(no_fire["fire_dq"]) and no_fire["fire_converged"] == 0


def test_summary_markdown_has_the_reference_row_and_skips_missing_numbers():
    rows = [crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0]), _tuned([2.0, 1.0])),
            crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [7.0, 3.0]), _tuned([1.0, 1.0]))]
    summary = [{"variant": "plain", "flags": "", **crossval.summarize_folds(rows)}]
    assert summary[0]["dq_ratio_mean"] == pytest.approx((1.5 / 3 + 1 / 3) / 2)
    assert summary[0]["fire_dq_mean"] == pytest.approx(4.5) and summary[0]["fire_converged_total"] == 2
    text = crossval.summary_markdown(summary, [], [crossval.reference_row(_base([10.0, 6.0], [4.0, 2.0],
                                                                               [5.0, 3.0]))] * 2)
    assert "| 2 | 8.000 ± 0.000 | 4.000 ± 0.000 | 2/4 |" in text
    old_row = {k: v for k, v in rows[0].items() if k not in ("basin_0.1", "dq_over_start")}  # older results
    assert "dq_over_start_mean" not in crossval.summarize_folds([old_row])
    assert summary[0]["kept_start_folds"] == [] and "Kept the starting model" not in text
    kept = _tuned([2.0, 1.0])
    kept["bptt_history"] = [{"epoch": 0, "val_mean_dq": 3.0}, {"epoch": 1, "val_mean_dq": 3.5}]
    rows_kept = [{"fold": 0, **rows[0]}, {"fold": 2, **crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0]),
                                                                         kept)}]
    assert [r["kept_start"] for r in rows_kept] == [False, True]
    summary_kept = [{"variant": "guided", "flags": "", **crossval.summarize_folds(rows_kept)}]
    assert summary_kept[0]["kept_start_folds"] == [2]
    assert "Kept the starting model" in crossval.summary_markdown(summary_kept, []) and "guided (fold 2)" in \
        crossval.summary_markdown(summary_kept, [])
    assert summary_kept[0]["exploded_folds"] == [] and "exploded" not in crossval.summary_markdown(summary_kept, [])
    exploded = _tuned([2.0, 1.0])
    exploded["bptt_history"] = [{"epoch": 1, "train_grad_norm": 9e8}, {"epoch": 2, "train_grad_norm": 100.0}]
    rows_exploded = [{"fold": 1, **crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0]), exploded)}]
    text_exploded = crossval.summary_markdown([{"variant": "plain", "flags": "",
                                                **crossval.summarize_folds(rows_exploded)}], [])
    assert "BPTT gradients exploded in some epoch" in text_exploded and "plain (fold 1)" in text_exploded
    one_fold = [{"variant": "plain", "flags": "", **crossval.summarize_folds(rows[:1])}]
    assert one_fold[0]["dq_std"] is None  # one fold has no spread: none is printed
    text = crossval.summary_markdown(one_fold, [], [crossval.reference_row(_base([10.0, 6.0], [4.0, 2.0],
                                                                               [5.0, 3.0]))])
    assert "±" not in text and "| plain | `(none)` | 1 | 1.500 | 0.500 |" in text


def _write_study(root: Path, starts, bptt_by_fold, fire=True):
    for k, (start, bptt) in enumerate(zip(starts, bptt_by_fold)):
        for name, res in (("base", _base(start, [s / 2 for s in start], [s / 3 for s in start], fire=fire)),
                          ("plain", _tuned(bptt))):
            (root / f"fold{k}" / name).mkdir(parents=True)
            (root / f"fold{k}" / name / "results.json").write_text(json.dumps(res))
    (root / "crossval.json").write_text(json.dumps({"folds_run": list(range(len(starts)))}))


def _compare(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.compare_models", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_compare_models_concatenates_folds_and_plots(tmp_path):
    starts = [[10.0, 6.0], [8.0, 4.0]]
    _write_study(tmp_path / "a", starts, [[1.0, 2.0], [3.0, 5.0]])
    _write_study(tmp_path / "b", starts, [[9.0, 1.0], [1.0, 1.0]], fire=False)
    proc = _compare(f"--studies=model A={tmp_path / 'a'},model B={tmp_path / 'b'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "compare.json").read_text())
    a, b = out["summary"]["model A"], out["summary"]["model B"]
    assert a["num_structures"] == 4 and a["start"]["mean"] == 7.0
    assert a["pretrained_fire"]["mean"] == pytest.approx(7 / 3)
    assert a["bptt"]["mean"] == 2.75 and a["bptt_closer_than_best_grid"] == 3  # [1, 2, 3, 5] < [5, 3, 4, 2]
    assert "pretrained_fire" not in b and b["bptt_closer_than_best_grid"] == 3
    assert (tmp_path / "out" / "dq_per_structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_models_uses_the_folds_every_study_ran(tmp_path):
    _write_study(tmp_path / "a", [[10.0, 6.0], [8.0, 4.0]], [[1.0, 2.0], [3.0, 5.0]])
    _write_study(tmp_path / "b", [[10.0, 6.0]], [[4.0, 4.0]])
    (tmp_path / "b" / "crossval.json").unlink()  # a study still running: its finished folds count
    proc = _compare(f"--studies=A={tmp_path / 'a'},B={tmp_path / 'b'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert out["folds"] == [0] and out["summary"]["A"]["bptt"]["mean"] == 1.5
    missing = _compare(f"--studies=A={tmp_path / 'a'},B={tmp_path / 'b'}", "--folds=0,1", f"--out={tmp_path / 'o2'}")
    assert missing.returncode != 0 and "fold 1 was not run" in missing.stderr


def test_compare_models_refuses_studies_of_other_structures(tmp_path):
    _write_study(tmp_path / "a", [[10.0, 6.0]], [[1.0, 2.0]])
    _write_study(tmp_path / "b", [[9.0, 6.0]], [[1.0, 2.0]])
    proc = _compare(f"--studies=A={tmp_path / 'a'},B={tmp_path / 'b'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode != 0 and "other test structures" in proc.stderr


def test_epoch_seconds_leaves_out_the_compiling_first_epoch():
    history = [{"epoch": 0, "val_mean_dq": 3.0}, {"epoch": 1, "epoch_s": 400.0}, {"epoch": 2, "epoch_s": 30.0},
               {"epoch": 3, "epoch_s": 50.0}]
    assert crossval.epoch_seconds(history) == pytest.approx(40.0)
    assert crossval.epoch_seconds(history[:2]) == pytest.approx(400.0)  # one epoch: all there is
    assert math.isnan(crossval.epoch_seconds([]))
    tuned = _tuned([2.0, 1.0])
    tuned["bptt_history"] = history
    rows = [crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0]), tuned),
            crossval.fold_row(_base([10.0, 6.0], [4.0, 2.0], [5.0, 3.0]), _tuned([1.0, 1.0]))]
    def table_row(row):
        return crossval.summary_markdown([{"variant": "plain", "flags": "", **crossval.summarize_folds([row])}],
                                         []).splitlines()[2]
    assert table_row(rows[0]).endswith("| 50 | 40 |")
    assert table_row(rows[1]).endswith("| 50 |  |")  # no history: blank, not nan
