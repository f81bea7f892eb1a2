"""The early-exit benchmark's sections on a tiny relaxing model: frame counts that the force calls actually made
confirm (a host callback runs only where its branch runs), early exit computes no more than the full scan, both
settings agree on end points and losses, and the JSON holds what the docs read."""

from __future__ import annotations

import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_mlip.data.trajectory import Trajectory
from bptt_mlip.relax import grid, scan, step_rules
from bptt_mlip.training import optim, steps
from experiments import benchmark_early_exit as bee
from experiments import timing

SPACING = 2.5  # Å between the wells' centres
MAX_FRAMES = 40
BATCH = 4


def _trajectories(n: int, seed: int) -> list:
    """``n`` 5-atom Si structures displaced 0.02-0.5 Å from the wells' centres (their relaxed end points)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        centres = SPACING * rng.integers(0, 4, (5, 3)).astype(float) + np.arange(5)[:, None] * [SPACING * 4, 0, 0]
        start = centres + rng.normal(0.0, [0.02, 0.1, 0.3, 0.5][i % 4], centres.shape)
        out.append(Trajectory(species=np.full(5, 14), cell=None, pbc=(False,) * 3, positions=np.stack([start, centres]),
                              traj_id=f"t{i}"))
    return out


def _well_force_fn(calls: list | None = None):
    """F = -k (x - nearest well centre) eV/Å on a cubic grid of centres (k learnable, eV/Å²); with ``calls`` every
    executed call appends the number of structures it relaxed."""

    def force_fn(params, structures):
        if calls is not None:
            jax.debug.callback(lambda x: calls.append(int(np.size(x))), structures.positions[:, 0, 0])
        x = structures.positions
        forces = -params["k"] * (x - SPACING * jnp.round(x / SPACING))
        return jnp.where(structures.mask[..., None], forces, 0.0)

    return force_fn


def _setup(force_fn, stop_fmax: float = 0.05) -> bee.Setup:
    rule = step_rules.FixedStep(0.2)
    params = {"model": {"k": jnp.asarray(2.0)}, "step_rule": rule.init()}
    rollout = scan.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, stop_fmax=stop_fmax)
    bptt = steps.BPTTConfig(rollout=scan.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, stop_fmax=stop_fmax,
                                                       remat="frame"))
    # grid: 0.15 and 0.3 stop at different frames, 1.2 (eta k > 2) oscillates to max_frames
    return bee.Setup({"wells": bee.Relaxer(force_fn, rule, params)}, _trajectories(8, 0), _trajectories(4, 1),
                     [0.15, 0.3, 1.2], _trajectories(8, 2), rollout, params, rule, bptt,
                     optim.OptimConfig(learning_rate=1e-2, freeze_step_rule=True), BATCH)


def test_frames_until_stopped_by_hand():
    # stopped by movement after 3 frames; by force before its 4th; diverged in its 5th; never; force check at the end
    frames = bee.frames_until_stopped(num_frames=[3, 3, 4, 10, 10], converged=[True, True, False, False, True],
                                      last_rms=[1e-4, 0.01, 0.02, 0.02, 0.02], stop_rms=1e-3, max_frames=10)
    np.testing.assert_array_equal(frames, [3, 4, 5, 10, 10])
    counts = bee.frame_counts([{"num_frames": np.array([3, 3, 1]), "converged": np.array([True, True, True]),
                                "last_rms": np.array([1e-4, 0.01, 0.0]), "weight": np.array([1.0, 1.0, 0.0])}],
                              max_frames=10, stop_rms=1e-3)
    assert counts == {"needed": 6, "computed_without": 20, "computed_with": 8}
    # compaction of 3 rows: sizes (1, 2, 3); running rows per frame 3, 2, 2, 1 (the padding row stops in frame 0)
    counts = bee.frame_counts([{"num_frames": np.array([3, 4, 1]), "converged": np.array([True, True, True]),
                                "last_rms": np.array([1e-4, 1e-4, 0.0]), "weight": np.array([1.0, 1.0, 0.0])}],
                              max_frames=10, stop_rms=1e-3, compact_levels=2)
    assert counts["computed_compact"] == 3 + 2 + 2 + 1 and counts["computed_with"] == 8


@pytest.mark.parametrize("stop_fmax", [0.0, 0.05])
def test_eval_counts_match_the_force_calls_made(stop_fmax):
    calls = []
    setup = _setup(_well_force_fn(calls), stop_fmax)
    relaxer = setup.relaxers["wells"]
    made = {}
    for label, fields in setup.settings("eval"):
        rollout = scan.RolloutConfig(max_frames=MAX_FRAMES, stop_rms=1e-3, stop_fmax=stop_fmax, **fields)
        run = bee.make_accounting_run(relaxer, rollout)
        batches = bee._batches(setup.test, BATCH)
        jax.block_until_ready([run(relaxer.params, b) for b in batches])  # compiles
        calls.clear()
        accounted = [jax.device_get(run(relaxer.params, b)) for b in batches]
        end_checks = len(batches) * BATCH if stop_fmax else 0  # the force rule's check of the end point
        made[label] = sum(calls) - end_checks
        counts = bee.frame_counts(accounted, MAX_FRAMES, 1e-3, compact_levels=setup.compact_levels)
    assert bool(np.all(np.concatenate([a["converged"] for a in accounted])))
    assert made["full scan"] == counts["computed_without"] == len(setup.test) * MAX_FRAMES
    assert made["early exit"] == counts["computed_with"]
    if not stop_fmax:  # the force rule stops a row in the frame it does not take: counted as running there
        assert made["early exit + compaction"] == counts["computed_compact"]
    assert counts["needed"] <= counts["computed_compact"] < counts["computed_with"] < counts["computed_without"]


def test_grid_under_vmap_stops_once_every_step_size_has_stopped():
    """The vmapped grid search relaxes in a while loop over the done mask of every (step size, row): with
    steps that all stop it calls the force model only until the slowest has stopped; with a step that
    oscillates to max_frames (1.2) every frame is computed, as without early exit; end points agree."""
    for etas, all_stop in (([0.15, 0.3], True), ([0.15, 0.3, 1.2], False)):
        made, results = {}, {}
        for early_exit in (False, True):
            calls = []
            setup = _setup(_well_force_fn(calls))
            batch = bee._batches(setup.grid_trajs, BATCH)[0]
            rollout = dataclasses.replace(setup.rollout, early_exit=early_exit)
            assert bee.grid_skips_frames(setup.relaxers["wells"].force_fn, setup.epoch_start["model"], batch, etas,
                                         rollout) == early_exit
            search = grid.make_grid_search(setup.relaxers["wells"].force_fn, rollout)
            steps_ = jnp.asarray(etas, jnp.float32)
            jax.block_until_ready(search(setup.epoch_start["model"], batch, steps_))
            calls.clear()
            results[early_exit] = jax.block_until_ready(search(setup.epoch_start["model"], batch, steps_))
            made[early_exit] = sum(calls)
        full = len(etas) * BATCH * (MAX_FRAMES + 1)  # + the end point's force check
        assert made[False] == full
        assert (made[True] < full) if all_stop else (made[True] == full)
        np.testing.assert_array_equal(np.asarray(results[True].num_frames), np.asarray(results[False].num_frames))
        np.testing.assert_allclose(np.asarray(results[True].dq), np.asarray(results[False].dq), atol=1e-5)
    assert int(np.max(results[True].num_frames[:2])) < MAX_FRAMES // 2  # the two small steps stop early


def test_interleaved_timing_takes_turns_and_reports_the_median():
    order = []
    clock = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0, 6.0, 6.5, 6.5, 9.0, 9.0, 9.25])  # a: 1, 2, 2.5; b: 3, 0.5, 0.25 s

    def call(label):
        return lambda: order.append(label) or jnp.asarray(len(order))

    counter = timing.CompileCounter()
    with mock.patch.object(timing.time, "perf_counter", lambda: next(clock)):
        out = timing.interleaved({"a": call("a"), "b": call("b")}, repeats=3, compiles=counter)
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then rounds in turn
    assert out["a"][1]["times_s"] == [1.0, 2.0, 2.5] and out["a"][1]["wall_s"] == 2.0
    assert out["b"][1]["times_s"] == [3.0, 0.5, 0.25] and out["b"][1]["wall_s"] == 0.5
    assert int(out["b"][0]) == 8 and out["a"][1]["compiles"] == 0 and len(out["a"][1]["loads_1min"]) == 3
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved({"a": call("a")}, repeats=0, compiles=counter)


def test_benchmark_rows_and_json():
    setup = dataclasses.replace(_setup(_well_force_fn()), repeats=2)
    rows = bee.benchmark(setup)
    expected = [(s, label) for s in bee.SECTIONS for label, _ in setup.settings(s)]
    assert [(r["section"], r["setting"]) for r in rows] == expected
    assert [label for _, label in expected].count("early exit + compaction") == 2  # not for the grid search
    for r in rows:
        assert r["frames_computed"] >= r["frames_needed"] > 0 and r["wall_s"] > 0
        full = next(f for f in rows if f["section"] == r["section"] and f["setting"] == "full scan")
        assert r["frames_computed"] <= full["frames_computed"]
        if r["setting"] != "full scan":
            if r["section"] != "grid":  # every structure stops well before max_frames: early exit saves frames
                assert r["frames_computed"] < full["frames_computed"]
            diffs = {k: v for k, v in r.items() if k.startswith("max_abs_diff")}
            assert diffs and max(diffs.values()) < 1e-4, diffs
        if r["section"] == "eval":
            assert r["num_frames_equal"] and r["max_abs_diff_positions"] < 1e-5
        if r["section"] == "epoch":
            assert r["frames_needed"] == r["frames_needed_trainer"]
    assert all(r["compiles"] == 0 for r in rows if r["section"] != "grid")  # timed calls run compiled code only
    out = bee.results_json(rows, {"quick": True})
    assert set(out) == {"meta", "settings", "rows"} and {"command", "date", "cpus", "devices"} <= set(out["meta"])
    assert all(len(r["times_s"]) == 2 and min(r["times_s"]) <= r["wall_s"] <= max(r["times_s"]) for r in rows)
    for key in ("section", "what", "setting", "early_exit", "compact_levels", "wall_s", "load_1min", "compiles",
                "frames_needed", "frames_computed",
                "computed_over_needed"):
        assert all(key in r for r in out["rows"]), key
    table = bee.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "x |" in table
