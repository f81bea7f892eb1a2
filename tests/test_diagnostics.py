"""Counts and warnings of evaluation results, on hand-built per-structure arrays: each warning is
raised when its condition holds and stays silent when it does not."""

from __future__ import annotations

import numpy as np
import pytest

from bptt_mlip.training import diagnostics as dg


def per(dq, dq_initial, frames, converged, diverged=None):
    n = len(dq)
    return {"dq": np.asarray(dq, float), "dq_initial": np.asarray(dq_initial, float),
            "num_frames": np.asarray(frames, np.int32), "converged": np.asarray(converged, bool),
            "diverged": np.zeros(n, bool) if diverged is None else np.asarray(diverged, bool)}


def test_relaxation_counts_by_hand():
    # 0: stopped at frame 1 and never moved; 1: converged at frame 8; 2: hit max_frames=10;
    # 3: ran away at frame 3; 4: stopped before its first frame (force rule): 0 frames
    p = per(dq=[5.0, 2.0, 3.0, np.nan, 4.0], dq_initial=[5.0 + 1e-4, 6.0, 6.0, 6.0, 4.0],
            frames=[1, 8, 10, 3, 0], converged=[1, 1, 0, 0, 1], diverged=[0, 0, 0, 1, 0])
    c = dg.relaxation_counts(p, max_frames=10)
    assert c == {"num_structures": 5, "num_converged": 3, "num_first_frame_stops": 2, "num_not_moved": 2,
                 "num_hit_max_frames": 1, "num_diverged": 1}
    w = dg.relaxation_warnings("pretrained", c)
    assert any("2 of 5 test rollouts stopped at their first frame" in s for s in w)
    assert any("2 of 5 test rollouts never moved" in s for s in w)
    assert any("1 of 5 test relaxations ran away" in s for s in w)


def test_relaxation_warnings_silent_when_rollouts_moved():
    p = per(dq=[1.0, 2.0], dq_initial=[5.0, 6.0], frames=[20, 30], converged=[1, 1])
    c = dg.relaxation_counts(p, max_frames=75)
    assert c["num_first_frame_stops"] == c["num_not_moved"] == c["num_diverged"] == 0
    assert dg.relaxation_warnings("BPTT", c) == []


def test_not_moved_tolerance_is_relative():
    assert list(dg.not_moved([10.0, 10.0, 10.0], [10.005, 10.02, np.nan])) == [True, False, False]
    assert list(dg.not_moved([10.0], [10.02], rtol=0.01)) == [True]


def test_baseline_max_frames_warning_only_when_most_hit_the_limit():
    most = dg.relaxation_counts(per([1, 1, 1], [2, 2, 2], [75, 75, 10], [0, 0, 1]), max_frames=75)
    assert most["num_hit_max_frames"] == 2
    (w,) = dg.baseline_max_frames_warning("pretrained", most, 75)
    assert "2 of 3" in w and "max_frames=75" in w
    half = dg.relaxation_counts(per([1, 1], [2, 2], [75, 10], [0, 1]), max_frames=75)
    assert dg.baseline_max_frames_warning("pretrained", half, 75) == []
    # only the baseline is checked for it
    d = dg.diagnose({"BPTT": per([1, 1, 1], [2, 2, 2], [75, 75, 75], [0, 0, 0])}, max_frames=75, baseline=None)
    assert not any("max_frames" in s for s in d["warnings"])
    d = dg.diagnose({"base": per([1, 1, 1], [2, 2, 2], [75, 75, 75], [0, 0, 0])}, max_frames=75, baseline="base")
    assert any("3 of 3 test rollouts reached max_frames=75" in s for s in d["warnings"])
    d = dg.diagnose({"base": per([1, 1, 1], [2, 2, 2], [75, 75, 75], [0, 0, 0])}, max_frames=75, baseline="base",
                    labels={"base": "pretrained, best grid step 0.04"})
    assert d["warnings"][0].startswith("pretrained, best grid step 0.04: 3 of 3") and "base" in d["relaxation"]


def test_fire_counts_and_warnings():
    p = per(dq=[5.0, 1.0, 2.0, 9.0], dq_initial=[5.0, 4.0, 4.0, 4.0], frames=[0, 40, 500, 12],
            converged=[1, 1, 0, 0], diverged=[0, 0, 0, 1])
    c = dg.fire_counts(p, max_steps=500)
    assert c == {"num_structures": 4, "num_converged": 2, "num_converged_at_step_0": 1, "num_not_moved": 1,
                 "num_hit_max_steps": 1, "num_diverged": 1}
    w = dg.fire_warnings(c, fmax=0.05)
    assert any("1 of 4 runs converged at step 0" in s and "fmax=0.05 eV/Å" in s for s in w)
    assert any("1 of 4 runs ran away" in s for s in w)
    assert not any("step limit" in s for s in w)  # 1 of 4 is not most
    stuck = dg.fire_counts(per([1, 1], [2, 2], [500, 500], [0, 0]), max_steps=500)
    assert any("2 of 2 runs hit the step limit" in s for s in dg.fire_warnings(stuck))
    fine = dg.fire_counts(per([1, 1], [2, 2], [30, 40], [1, 1]), max_steps=500)
    assert dg.fire_warnings(fine) == []


def grid(steps, mean_dq, n=2, frames=20, converged=True):
    s = len(steps)
    return {"step_sizes": np.asarray(steps, float), "mean_dq": np.asarray(mean_dq, float),
            "dq": np.tile(np.asarray(mean_dq, float)[:, None], (1, n)),
            "converged": np.full((s, n), converged), "num_frames": np.full((s, n), frames, np.int32),
            "diverged": np.zeros((s, n), bool)}


def test_grid_best_step_at_either_edge_warns_inside_does_not():
    upper = dg.grid_counts(grid([0.01, 0.02, 0.04], [3.0, 2.0, 1.0]), max_frames=75)
    assert upper["best_at_edge"] == "upper" and upper["best_step"] == 0.04 and not upper["flat"]
    (w,) = dg.grid_warnings(upper)
    assert "0.04 Å²/eV is the upper edge" in w and "0.01-0.04" in w
    lower = dg.grid_counts(grid([0.04, 0.01, 0.02], [3.0, 1.0, 2.0]), max_frames=75)  # unsorted steps
    assert lower["best_at_edge"] == "lower" and lower["best_step"] == 0.01
    inside = dg.grid_counts(grid([0.01, 0.02, 0.04], [3.0, 1.0, 2.0]), max_frames=75)
    assert inside["best_at_edge"] == "" and dg.grid_warnings(inside) == []
    assert inside["relative_spread"] == pytest.approx(2.0)


def test_flat_grid_warns_with_its_spread():
    flat = dg.grid_counts(grid([0.01, 0.02, 0.04], [5.0, 5.01, 5.02], frames=1), max_frames=75)
    assert flat["flat"] and flat["relative_spread"] == pytest.approx(0.004)
    (w,) = dg.grid_warnings(flat)
    assert "flat" in w and "0.40%" in w
    assert flat["at_best_step"]["num_first_frame_stops"] == 2
    assert not dg.grid_counts(grid([0.01, 0.02, 0.04], [5.0, 4.0, 4.5]), max_frames=75)["flat"]


def test_grid_with_no_finite_mean():
    c = dg.grid_counts(grid([0.01, 0.02], [np.inf, np.inf]), max_frames=75)
    assert c["best_step"] is None and "no step size" in dg.grid_warnings(c)[0]


def test_force_warning_at_the_zero_force_ratio():
    bad = dg.force_counts({"force_rmse": 0.70, "zero_force_rmse": 0.71})
    assert bad["ratio_to_zero_force"] == pytest.approx(0.70 / 0.71)
    (w,) = dg.force_warnings(bad)
    assert "0.7 eV/Å is no better than predicting zero force (0.71 eV/Å" in w
    assert dg.force_warnings(dg.force_counts({"force_rmse": 0.61, "zero_force_rmse": 0.71})) == []


def test_tuned_force_warning_above_1_1x_the_pretrained_or_zero_force():
    pre = dg.force_counts({"force_rmse": 0.5946, "zero_force_rmse": 0.7129})
    worse = dg.force_counts({"force_rmse": 0.9428, "zero_force_rmse": 0.7129})  # the main job's BPTT, measured
    (w,) = dg.tuned_force_warnings(worse, pre)
    assert "0.9428 eV/Å is 1.59x the pretrained model's (0.5946) and no better than predicting zero force" in w
    slightly = dg.force_counts({"force_rmse": 0.66, "zero_force_rmse": 0.7129})  # 1.11x, still below zero force
    (w,) = dg.tuned_force_warnings(slightly, pre)
    assert "1.11x" in w and "zero force" not in w.split(":")[0]
    assert dg.tuned_force_warnings(dg.force_counts({"force_rmse": 0.65, "zero_force_rmse": 0.7129}), pre) == []
    diag = dg.diagnose({}, max_frames=75, pretrained_forces={"force_rmse": 0.5946, "zero_force_rmse": 0.7129},
                       tuned_forces={"force_rmse": 0.9428, "zero_force_rmse": 0.7129})
    assert diag["tuned_forces"]["force_rmse"] == 0.9428 and any("BPTT-tuned" in w for w in diag["warnings"])


def test_unseen_elements_named():
    c = dg.element_counts([[14, 14], [14]], [[14, 29], [11, 17]])
    assert c == {"train": ["Si"], "test": ["Na", "Si", "Cl", "Cu"], "unseen_in_training": ["Na", "Cl", "Cu"]}
    (w,) = dg.element_warnings(c)
    assert "Na, Cl, Cu" in w and "training had Si" in w
    assert dg.element_warnings(dg.element_counts([[14, 8]], [[8, 14]])) == []


def test_kept_start_warning_when_no_epoch_beats_the_starting_model():
    # the run of fold 2, guided gradients, periodic ADAPT (docs/results.md): validation Dq rose every epoch
    rose = [{"epoch": 0, "val_mean_dq": 3.7623}, {"epoch": 1, "val_mean_dq": 3.8889, "train_dq": 5.2},
            {"epoch": 2, "val_mean_dq": 4.0026}, {"epoch": 3, "val_mean_dq": 5.148}]
    (w,) = dg.kept_start_warnings(rose)
    assert "3.762" in w and "3.889 at epoch 1 of 3" in w and "starting model unchanged" in w
    fell = [*rose[:2], {"epoch": 2, "val_mean_dq": 3.70}]
    assert dg.kept_start_warnings(fell) == []
    assert dg.kept_start_warnings(rose[:1]) == []  # no fine-tuning epoch: nothing to say
    assert dg.kept_start_warnings([{"epoch": 0, "val_mean_dq": 3.0}, {"epoch": 1, "val_mean_dq": float("nan")}]) == []
    assert dg.kept_start_warnings([{"epoch": 1, "val_mean_dq": 3.0}]) == []  # no starting value recorded
    loud = dg.diagnose({"pretrained": per([1.0], [5.0], [20], [1])}, max_frames=75, bptt_history=rose)
    assert loud["warnings"] == [w]


def test_exploding_gradient_warning_names_the_epochs():
    # fold 0 of the equivariant model's cross-validation, plain BPTT (docs/results.md): epoch 1 exploded
    history = [{"epoch": 0, "val_mean_dq": 2.728}, {"epoch": 1, "train_grad_norm": 906349453.5},
               {"epoch": 2, "train_grad_norm": 281.1}, {"epoch": 3, "train_grad_norm": 103.7}]
    (w,) = dg.exploding_gradient_warnings(history)
    assert "1 of 3 epochs (epoch 1: 9.06e+08; median of the other epochs 192)" in w
    assert dg.exploding_gradient_warnings(history[:1] + history[2:]) == []
    (nan,) = dg.exploding_gradient_warnings([{"epoch": 1, "train_grad_norm": float("nan")}])
    assert "epoch 1: nan" in nan and "other epochs" not in nan
    loud = dg.diagnose({"pretrained": per([1.0], [5.0], [20], [1])}, max_frames=75, bptt_history=history)
    assert loud["warnings"] == [w]


def test_diagnose_collects_every_part():
    moved = per([1.0, 2.0], [5.0, 6.0], [20, 30], [1, 1])
    quiet = dg.diagnose({"pretrained": moved, "BPTT": moved}, max_frames=75, baseline="pretrained", fire=moved,
                        fire_max_steps=500, fire_fmax=0.05, grid=grid([0.01, 0.02, 0.04], [3.0, 1.0, 2.0]),
                        pretrained_forces={"force_rmse": 0.3, "zero_force_rmse": 0.7},
                        train_species=[[14]], test_species=[[14]])
    assert quiet["warnings"] == []
    assert set(quiet) == {"relaxation", "fire", "grid", "forces", "elements", "warnings"}
    assert quiet["relaxation"]["BPTT"]["num_converged"] == 2
    stuck = per([5.0, 6.0], [5.0, 6.0], [1, 1], [1, 1])
    loud = dg.diagnose({"pretrained": stuck}, max_frames=75, baseline="pretrained", fire=per([5.0], [5.0], [0], [1]),
                       grid=grid([0.01, 0.02], [5.5, 5.5], frames=1),
                       pretrained_forces={"force_rmse": 0.7, "zero_force_rmse": 0.7},
                       train_species=[[14]], test_species=[[29]])
    assert len(loud["warnings"]) == 6  # first frame, never moved, FIRE step 0, flat grid, forces, elements
    with pytest.raises(KeyError, match="baseline 'x'"):
        dg.diagnose({"pretrained": moved}, max_frames=75, baseline="x")
