"""Properties of the method that the rest of the suite does not pin down, each checked against a
value computed here by hand:

* the stopping rule: a structure stops at exactly the first frame whose RMS movement is below
  ``stop_rms`` (a harmonic force with a fixed step moves each frame by a known geometric amount);
* padded batch rows (weight 0) change neither the BPTT loss, its gradient and the trainer's
  update, nor the grid-search mean;
* the ADAPT input pipeline applies the published standardisation ``(v - mean) / (0.3 (std + 1e-6))``
  and maps its output back to eV/Å with ``out * 0.3 (std + 1e-6) + mean``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import descriptors, losses, relax
from bptt_mlip.data.trajectory import make_trajectory
from bptt_mlip.models import potentials
from bptt_mlip.models.adapt import Adapt, adapt_forces, model_inputs
from bptt_mlip.structures import RelaxationBatch
from bptt_mlip.training import evaluate, steps

# ----------------------------------------------------------------------------- the stopping rule

SPRING = 1.0  # eV/Å²: force F = -SPRING * x pulls every atom toward the origin
ETA = 0.25  # Å²/eV: each frame moves an atom by ETA * SPRING = 1/4 of its distance to the origin
SHRINK = 1.0 - ETA * SPRING  # distance (and movement) left after one frame


def spring_forces(params, structures: bm.Structures) -> jnp.ndarray:
    """F = -k x on real atoms (eV/Å), k = ``params["k"]`` in eV/Å²."""
    return jnp.where(structures.mask[..., None], -params["k"] * structures.positions, 0.0)


# Three structures of different sizes and start distances (Å); the batch is padded to 4 atoms and
# has a fourth, empty row.
SPRING_STARTS = [
    np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]),
    np.array([[0.3, 0.4, 0.0], [0.0, 0.0, -0.5]]),
    np.array([[2.0, -1.0, 2.0], [0.5, 0.5, 0.5], [-1.0, 0.0, 0.0], [0.2, 0.1, -0.3]]),
]


def hand_movements(start: np.ndarray, frames: int) -> np.ndarray:
    """RMS movement (Å) of frames 1..frames of the spring relaxation, in closed form (float64).

    Frame t (1-based) moves every atom by ``ETA * SPRING * SHRINK**(t-1) * x0``, so its RMS over
    the real atoms is ``ETA * SPRING * SHRINK**(t-1) * rms(x0)``.
    """
    rms0 = np.sqrt(np.mean(np.sum(start**2, axis=-1)))
    return ETA * SPRING * SHRINK ** np.arange(frames) * rms0


def first_frame_below(movements: np.ndarray, stop_rms: float) -> int:
    """1-based index of the first frame whose movement is below ``stop_rms``."""
    below = np.nonzero(movements < stop_rms)[0]
    assert below.size, "the threshold is never reached within the frames given"
    return int(below[0]) + 1


def spring_rollout(stop_rms: float, max_frames: int = 60) -> bm.RolloutResult:
    s = bm.from_arrays([["Si"] * len(x) for x in SPRING_STARTS], SPRING_STARTS, max_atoms=4, batch_size=4)
    params = {"model": {"k": jnp.asarray(SPRING)}, "step_rule": {}}
    config = relax.RolloutConfig(max_frames=max_frames, stop_rms=stop_rms)
    return relax.rollout(spring_forces, relax.FixedStep(ETA), params, s, relax.FrameModifiers(), config)


def test_hand_computed_stopping_frames_are_what_the_test_expects():
    # frame t of structure 0 moves 0.25 * 0.75**(t-1) Å (RMS start distance 1 Å): frame 9 moves
    # 0.02503 Å, frame 10 0.01877 Å
    moves = hand_movements(SPRING_STARTS[0], 12)
    np.testing.assert_allclose(moves[8:10], [0.25 * 0.75**8, 0.25 * 0.75**9], rtol=1e-12)
    assert first_frame_below(moves, 0.02) == 10 and first_frame_below(moves, 0.025) == 10
    assert first_frame_below(moves, 0.0251) == 9


@pytest.mark.parametrize("structure", [0, 1, 2])
@pytest.mark.parametrize("side", ["just_above", "just_below"])
def test_structure_stops_at_the_first_frame_whose_movement_is_below_stop_rms(structure, side):
    """The threshold sits 0.1% above or below one frame's movement: the stop is that frame or
    the next one, never one later, never at 10x the threshold."""
    frame_of_threshold = 8  # 1-based: the threshold is put next to this frame's movement of ``structure``
    moves = hand_movements(SPRING_STARTS[structure], frame_of_threshold)
    stop_rms = float(moves[-1]) * (1.001 if side == "just_above" else 0.999)
    result = spring_rollout(stop_rms)
    for b, start in enumerate(SPRING_STARTS):
        expected = first_frame_below(hand_movements(start, 60), stop_rms)
        if b == structure:
            assert expected == (frame_of_threshold if side == "just_above" else frame_of_threshold + 1)
        assert int(result.num_frames[b]) == expected, f"structure {b}, stop_rms {stop_rms:.6g} Å"
        assert bool(result.converged[b]) and not bool(result.diverged[b])
        np.testing.assert_allclose(float(result.last_rms[b]), hand_movements(start, expected)[-1], rtol=1e-5)
        # positions frozen after the stopping frame: x0 * SHRINK**frames
        np.testing.assert_allclose(np.asarray(result.positions[b, : len(start)]), start * SHRINK**expected,
                                   rtol=1e-5, atol=1e-7)
    assert int(result.num_frames[3]) <= 1  # the empty row: zero movement, stops at once


def test_structure_does_not_stop_at_ten_times_the_threshold():
    # a threshold 10x smaller than a frame's movement must let that frame and the next ones run:
    # 0.75**8 = 0.100 < 1/10, so the stop comes exactly 9 frames later (8 frames shrink by 0.1001)
    moves = hand_movements(SPRING_STARTS[0], 60)
    stop_rms = float(moves[4]) / 10.0
    result = spring_rollout(stop_rms)
    assert first_frame_below(moves, stop_rms) == 5 + 9
    assert int(result.num_frames[0]) == 14


def test_structure_that_never_gets_below_stop_rms_takes_every_frame():
    result = spring_rollout(1e-6, max_frames=12)
    np.testing.assert_array_equal(np.asarray(result.num_frames[:3]), [12, 12, 12])
    assert not np.any(np.asarray(result.converged[:3]))


# ----------------------------------------------------------------------------- padded batch rows


def cluster(n: int, seed: int, spacing: float = 2.4, noise: float = 0.25) -> np.ndarray:
    """A slightly disordered simple-cubic Si cluster of n atoms (Å)."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], float)[:n] * spacing
    return grid + rng.normal(0.0, noise, grid.shape)


REAL_SIZES = (5, 7)
MAX_ATOMS = 8


def real_rows() -> tuple[list, list]:
    starts = [cluster(n, seed) for seed, n in enumerate(REAL_SIZES)]
    targets = [x + np.random.default_rng(10 + i).normal(0.0, 0.08, x.shape) for i, x in enumerate(starts)]
    return starts, targets


def relaxation_batch(starts, targets, weight) -> RelaxationBatch:
    s = bm.from_arrays([["Si"] * len(x) for x in starts], starts, max_atoms=MAX_ATOMS, batch_size=len(weight))
    target = np.zeros((len(weight), MAX_ATOMS, 3), np.float32)
    for i, t in enumerate(targets):
        target[i, : len(t)] = t
    return RelaxationBatch(initial=s, target_positions=jnp.asarray(target), weight=jnp.asarray(weight, jnp.float32))


def unpadded_batch() -> RelaxationBatch:
    starts, targets = real_rows()
    return relaxation_batch(starts, targets, [1.0, 1.0])


def padded_batch() -> RelaxationBatch:
    """The real rows, an empty row (no atoms), and a garbage row with weight 0: real atoms, some
    pairs 0.6 Å apart (huge Morse forces: the row diverges), and a target far away."""
    starts, targets = real_rows()
    rng = np.random.default_rng(99)
    garbage = rng.uniform(0.0, 3.0, (6, 3))
    garbage[1] = garbage[0] + [0.6, 0.0, 0.0]
    batch = relaxation_batch(starts + [garbage], targets + [garbage + 5.0], [1.0, 1.0, 0.0, 0.0])
    # the garbage row moves to index 3; index 2 stays empty
    swap = np.array([0, 1, 3, 2])
    return jax.tree_util.tree_map(lambda x: x[swap], batch)


BPTT_CONFIG = steps.BPTTConfig(rollout=relax.RolloutConfig(max_frames=12, stop_rms=1e-3))
MORSE_PARAMS = {"model": potentials.init_morse_params(depth=0.5, r0=2.3), "step_rule": {"eta": jnp.asarray(0.04)}}


def loss_and_gradient(batch: RelaxationBatch):
    fn = jax.jit(jax.value_and_grad(steps.bptt_loss, has_aux=True), static_argnums=(2, 3, 4))
    return fn(MORSE_PARAMS, batch, potentials.morse_force_fn, relax.LearnableStep(0.04), BPTT_CONFIG,
              jax.random.PRNGKey(0))


def assert_trees_close(got, want, rtol=1e-5, atol=1e-7):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
                           got, want)


def test_padded_batch_is_what_the_test_means():
    batch = padded_batch()
    np.testing.assert_array_equal(np.asarray(batch.initial.num_atoms()), [5, 7, 0, 6])
    np.testing.assert_array_equal(np.asarray(batch.weight), [1, 1, 0, 0])
    res = relax.rollout(potentials.morse_force_fn, relax.LearnableStep(0.04), MORSE_PARAMS, batch.initial,
                        relax.FrameModifiers(), BPTT_CONFIG.rollout)
    assert bool(res.diverged[3]), "the garbage row should run away (it is there to be large)"
    dq = losses.delta_q(res.positions, batch.target_positions, batch.initial.masses, batch.initial.mask)
    assert float(dq[3]) > 10 * float(jnp.max(dq[:2]))


def test_padded_rows_change_neither_bptt_loss_nor_its_gradient():
    (loss, aux), grads = loss_and_gradient(unpadded_batch())
    (loss_p, aux_p), grads_p = loss_and_gradient(padded_batch())
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    assert_trees_close(grads_p, grads)
    assert float(jnp.abs(grads["step_rule"]["eta"])) > 0 and float(jnp.abs(grads["model"]["r0"])) > 0
    for name in ("endpoint_loss", "dq", "frames"):
        np.testing.assert_allclose(float(aux_p[name]), float(aux[name]), rtol=1e-6, err_msg=name)
    for name in ("converged", "diverged"):
        assert int(aux_p[name]) == int(aux[name]), name


def test_a_weightless_row_with_non_finite_positions_changes_no_gradient():
    # a hand-built batch may carry anything in a weight-0 row: it must not reach the gradient
    # through 0 * NaN (the value alone was always right; the gradient used to be NaN everywhere)
    batch = padded_batch()
    positions = batch.initial.positions.at[3, 0, 0].set(jnp.nan)
    batch = batch.replace(initial=batch.initial.replace(positions=positions))
    (loss, _), grads = loss_and_gradient(unpadded_batch())
    (loss_nan, _), grads_nan = loss_and_gradient(batch)
    np.testing.assert_allclose(float(loss_nan), float(loss), rtol=1e-6)
    assert_trees_close(grads_nan, grads)


def test_padded_rows_change_nothing_in_a_trainer_update():
    trainer = steps.make_bptt_trainer(potentials.morse_force_fn, relax.LearnableStep(0.04), BPTT_CONFIG,
                                      bm.make_optimizer(bm.OptimConfig(learning_rate=0.01)))
    state = trainer.init(MORSE_PARAMS, jax.random.PRNGKey(1))
    new, metrics = trainer.update(state, unpadded_batch())
    new_p, metrics_p = trainer.update(state, padded_batch())
    assert_trees_close(new_p.params, new.params, rtol=1e-6)
    for name in ("loss", "grad_norm", "dq", "frames", "converged", "diverged"):
        np.testing.assert_allclose(float(metrics_p[name]), float(metrics[name]), rtol=1e-5, err_msg=name)


GRID_STEPS = jnp.asarray([0.01, 0.03, 0.06])
GRID_ROLLOUT = relax.RolloutConfig(max_frames=15, stop_rms=1e-3)


def test_padded_rows_do_not_change_the_grid_search_mean():
    search = bm.make_grid_search(potentials.morse_force_fn, GRID_ROLLOUT)
    mp = MORSE_PARAMS["model"]
    ref = search(mp, unpadded_batch(), GRID_STEPS)
    got = search(mp, padded_batch(), GRID_STEPS)
    np.testing.assert_allclose(np.asarray(got.mean_dq), np.asarray(ref.mean_dq), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.dq[:, :2]), np.asarray(ref.dq), rtol=1e-6)
    # and the mean is the plain mean over the real rows
    np.testing.assert_allclose(np.asarray(ref.mean_dq), np.asarray(ref.dq).mean(axis=1), rtol=1e-6)


def test_padded_rows_do_not_change_the_grid_table():
    rng = np.random.default_rng(5)
    trajs = []
    for i, n in enumerate((5, 6, 7)):
        start = cluster(n, 20 + i)
        trajs.append(make_trajectory(["Si"] * n, np.stack([start, start + rng.normal(0.0, 0.08, start.shape)]),
                                     traj_id=str(i)))
    mp = MORSE_PARAMS["model"]
    table = lambda b: evaluate.grid_table(potentials.morse_force_fn, mp, trajs, [0.01, 0.03, 0.06], GRID_ROLLOUT,
                                          batch_size=b, buckets=(MAX_ATOMS,))
    whole = table(3)  # one batch, no padding
    padded = table(2)  # two batches, the second with one weight-0 row
    assert whole["dq"].shape == padded["dq"].shape == (3, 3)
    np.testing.assert_allclose(padded["dq"], whole["dq"], rtol=1e-6)
    np.testing.assert_allclose(padded["mean_dq"], whole["mean_dq"], rtol=1e-6)
    np.testing.assert_array_equal(padded["num_frames"], whole["num_frames"])


# ----------------------------------------------------------------------------- published standardisation

# Statistics with spread in every column (no column near zero spread). Column 2's std of 0.01 makes
# the published 1e-6 visible in float32: leaving it out changes that column by 1e-4 relative.
INPUT_MEAN = np.array([1.5, -0.5, 2.0, 12.0, 0.5, 25.0, 1.1, 3.0, 0.2, 0.8, 110.0, 2.2])
INPUT_STD = np.array([2.0, 1.5, 0.01, 4.0, 0.3, 9.0, 0.5, 1.2, 0.05, 0.4, 30.0, 0.9])
FORCE_MEAN = np.array([0.02, -0.01, 0.005])
FORCE_STD = np.array([0.6, 0.45, 0.02])


def normalizer() -> bm.Normalizer:
    return bm.Normalizer(input_mean=jnp.asarray(INPUT_MEAN, jnp.float32), input_std=jnp.asarray(INPUT_STD, jnp.float32),
                         force_mean=jnp.asarray(FORCE_MEAN, jnp.float32), force_std=jnp.asarray(FORCE_STD, jnp.float32))


def standardised_by_hand(position: np.ndarray, symbol: str) -> np.ndarray:
    """The published per-atom input: (x, y, z, 9 descriptors), each (v - mean) / (0.3 (std + 1e-6))."""
    raw = np.concatenate([position, descriptors.element_features(descriptors.atomic_numbers([symbol]))[0]])
    return (raw - INPUT_MEAN) / (0.3 * (INPUT_STD + 1e-6))


def standardisation_structures() -> bm.Structures:
    return bm.from_arrays([["Si", "C", "Si"], ["C", "Si"]],
                          [np.array([[0.1, 0.2, 2.05], [1.9, -0.4, 1.95], [3.0, 1.0, 2.08]]),
                           np.array([[0.5, 0.5, 1.93], [2.5, 2.5, 2.0]])], max_atoms=4)


STANDARDISED_ATOMS = [(0, 0, "Si"), (0, 1, "C"), (0, 2, "Si"), (1, 0, "C"), (1, 1, "Si")]


def inputs_close(got, want) -> bool:
    """float32 agreement of standardised inputs (values of order 1-20)."""
    return np.allclose(got, want, rtol=2e-6, atol=1e-4)


def test_descriptor_values_used_by_hand_are_real_numbers_with_spread():
    z = descriptors.atomic_numbers(["Si", "C"])
    f = descriptors.element_features(z)
    assert f.shape == (2, descriptors.NUM_DESCRIPTORS) and np.all(np.isfinite(f))
    assert np.count_nonzero(f[0] != f[1]) >= 5  # Si and C differ in most descriptors


def test_adapt_inputs_are_the_published_standardisation():
    s = standardisation_structures()
    got = np.asarray(model_inputs(s, normalizer(), bm.TINY))
    assert got.shape == (2, 4, 12)
    for b, i, symbol in STANDARDISED_ATOMS:
        want = standardised_by_hand(np.asarray(s.positions[b, i], np.float64), symbol)
        assert inputs_close(got[b, i], want), f"structure {b} atom {i}: {got[b, i]} != {want}"
    np.testing.assert_array_equal(got[0, 3], 0.0)  # padded atoms get zero input
    np.testing.assert_array_equal(got[1, 2:], 0.0)
    # the comparison can tell the published 0.3 and 1e-6 from near misses
    raw = np.concatenate([np.asarray(s.positions[0, 0], np.float64),
                          descriptors.element_features(descriptors.atomic_numbers(["Si"]))[0]])
    for near_miss in (0.3 * INPUT_STD, 0.3 * (INPUT_STD + 1e-5), 0.31 * (INPUT_STD + 1e-6), INPUT_STD + 1e-6):
        assert not inputs_close(got[0, 0], (raw - INPUT_MEAN) / near_miss)


def test_adapt_forces_are_published_destandardisation_of_its_output():
    s = standardisation_structures()
    params = bm.init_params(bm.TINY, jax.random.PRNGKey(3), max_atoms=4)
    inputs = np.zeros((2, 4, 12), np.float32)
    for b, i, symbol in STANDARDISED_ATOMS:
        inputs[b, i] = standardised_by_hand(np.asarray(s.positions[b, i], np.float64), symbol)
    out = np.asarray(Adapt(bm.TINY).apply({"params": params}, jnp.asarray(inputs), s.mask, True), np.float64)
    want = np.where(np.asarray(s.mask)[..., None], out * (0.3 * (FORCE_STD + 1e-6)) + FORCE_MEAN, 0.0)
    got = np.asarray(adapt_forces(params, s, bm.TINY, normalizer()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(want[np.asarray(s.mask)]) > 0)
    np.testing.assert_allclose(got, np.asarray(bm.make_force_fn(bm.TINY, normalizer())(params, s)), rtol=1e-6)
