"""The basin metric: the fraction of relaxations whose every atom ends within d Å of the reference."""

import jax.numpy as jnp
import numpy as np

from bptt_mlip import losses
from bptt_mlip.training import evaluate


def test_largest_atom_distance_is_the_largest_real_atom_distance():
    rng = np.random.default_rng(0)
    predicted, target = rng.normal(size=(2, 3, 4, 3))
    mask = np.array([[True, True, False, False], [True, True, True, True], [False] * 4])
    predicted[0, 2:] += 100.0  # padded atoms far off must not count
    got = np.asarray(losses.largest_atom_distance(jnp.asarray(predicted), jnp.asarray(target), jnp.asarray(mask)))
    want = [np.linalg.norm(predicted[0, :2] - target[0, :2], axis=-1).max(),
            np.linalg.norm(predicted[1] - target[1], axis=-1).max(), 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_basin_fractions_count_by_hand():
    per = {"largest_atom_error": np.array([0.01, 0.07, 0.15, 0.3, 0.02, np.nan]),
           "diverged": np.array([False, False, False, False, True, False]),
           "converged": np.array([True, True, False, True, False, False]),
           "num_frames": np.array([10, 20, 75, 30, 3, 75])}
    got = evaluate.basin_fractions(per)
    # 0.05: only the first (the fifth diverged); 0.1: first two; 0.2: first three; NaN is never inside
    assert got["basin_0.05"] == 1 / 6 and got["basin_0.1"] == 2 / 6 and got["basin_0.2"] == 3 / 6
    assert got["mean_frames_converged"] == 20.0
    assert evaluate.basin_fractions({"dq": np.zeros(2)}) == {}
    summary = evaluate.summarize({**per, "dq": np.ones(6), "dq_initial": np.ones(6)})
    assert summary["basin_0.1"] == 2 / 6
