"""The stiffest-mode estimate against dense eigenvalues: a linear force with a known stiffness matrix,
the equivariant model's Hessian from ``jax.hessian`` of its energy, padding, and the frame map's
growth along the stiffest mode on either side of eta * k = 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import structures as st
from bptt_mlip.models import equivariant as eq
from bptt_mlip.relax import stability

CONFIG = eq.EquivariantConfig(cutoff=3.2, channels=4, max_angular=2, num_layers=2, num_radial=4, radial_hidden=8,
                              capacity=16, avg_neighbours=6.0)
SCALE = 20.0  # eV: gives the tiny random model O(0.1-1) eV/Å forces on sparse cells
CELL = np.array([[7.0, 0.0, 0.0], [1.1, 6.9, 0.0], [0.6, -0.8, 7.2]])  # Å, triclinic


def _as64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                  tree)


def _sparse_cell(n, seed):
    """n atoms of Si and C in CELL, no two closer than 1.7 Å under the minimum image."""
    rng, inverse, out = np.random.default_rng(seed), np.linalg.inv(CELL), []
    while len(out) < n:
        x = rng.uniform(0.0, 1.0, 3) @ CELL
        if all(np.linalg.norm(((x - y) @ inverse - np.round((x - y) @ inverse)) @ CELL) >= 1.7 for y in out):
            out.append(x)
    return ["Si" if i % 3 else "C" for i in range(n)], np.array(out)


def _stiffness(n_atoms, top, seed):
    """Symmetric positive [3n, 3n] matrix (eV/Å^2) with eigenvalues in [0.1, 1] and one at ``top``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3 * n_atoms, 3 * n_atoms)))
    eigs = np.linspace(0.1, 1.0, 3 * n_atoms)
    eigs[-1] = top
    return (q * eigs) @ q.T


def _linear_force_fn(stiffness_per_structure, rest):
    """F(X) = -K (X - X0) on real atoms; padded atoms get a large force that depends on their position,
    which the estimate must ignore."""
    k = jnp.asarray(stiffness_per_structure)

    def force_fn(_, s):
        b, n = s.mask.shape
        d = (s.positions - rest).reshape(b, n * 3)
        f = -jnp.einsum("bij,bj->bi", k, d).reshape(b, n, 3)
        return jnp.where(s.mask[..., None], f, 100.0 * s.positions**2)
    return force_fn


def _padded_structures(n_real, n_padded, seed):
    rng = np.random.default_rng(seed)
    return st.from_arrays([["Si"] * n_real], [rng.normal(size=(n_real, 3)) * 3.0], [np.eye(3) * 20.0],
                          max_atoms=n_padded)


def test_linear_force_curvature_equals_the_largest_eigenvalue_and_padding_is_ignored():
    n_real, n_padded = 4, 6
    k_real = _stiffness(n_real, top=7.5, seed=0)
    k = np.zeros((1, 3 * n_padded, 3 * n_padded))
    k[0, : 3 * n_real, : 3 * n_real] = k_real
    s = _padded_structures(n_real, n_padded, seed=1)
    force_fn = _linear_force_fn(k, rest=s.positions + 0.3)
    estimate = stability.stiffest_curvature(force_fn, None, s, iterations=60)
    np.testing.assert_allclose(np.asarray(estimate), [np.linalg.eigvalsh(k_real).max()], rtol=1e-4)
    unpadded = _padded_structures(n_real, n_real, seed=1)
    alone = stability.stiffest_curvature(_linear_force_fn(k_real[None], rest=unpadded.positions + 0.3), None,
                                         unpadded, iterations=60)
    np.testing.assert_allclose(np.asarray(estimate), np.asarray(alone), rtol=1e-5)


def test_equivariant_curvature_equals_the_dense_hessian():
    with jax.enable_x64(True):
        cells = [_sparse_cell(8, seed=0), _sparse_cell(6, seed=4)]
        s = _as64(st.from_arrays([c[0] for c in cells], [c[1] for c in cells], [CELL, CELL]))
        params = _as64(eq.init_params(CONFIG, jax.random.PRNGKey(3)))
        energy_fn = eq.make_energy_fn(CONFIG, SCALE)
        estimate = np.asarray(stability.stiffest_curvature(eq.make_force_fn(CONFIG, SCALE), params, s,
                                                           iterations=300))
        for b, n in enumerate([8, 6]):
            def energy(x, b=b, n=n):
                return energy_fn(params, s.replace(positions=s.positions.at[b, :n].set(x.reshape(n, 3))))[b]
            hessian = np.asarray(jax.hessian(energy)(s.positions[b, :n].reshape(-1)))
            dense = np.abs(np.linalg.eigvalsh(hessian)).max()
            assert dense > 1e-2  # a real curvature, not zeros against zeros
            np.testing.assert_allclose(estimate[b], dense, rtol=1e-3)


def test_frame_map_grows_the_stiffest_mode_above_eta_k_two():
    k_real = _stiffness(3, top=4.0, seed=2)
    s = _padded_structures(3, 3, seed=3)
    rest = s.positions
    force_fn = _linear_force_fn(k_real[None], rest=rest)
    k = float(stability.stiffest_curvature(force_fn, None, s, iterations=80)[0])
    top_mode = np.linalg.eigh(k_real)[1][:, -1].reshape(1, 3, 3)
    for times, grows in [(1.9, False), (2.1, True)]:
        eta = times / k
        np.testing.assert_allclose(float(stability.step_times_curvature(eta, k)), times, rtol=1e-6)
        x = rest + 1e-2 * top_mode
        for _ in range(20):  # the frame X + eta F(X)
            x = x + eta * force_fn(None, s.replace(positions=x))
        growth = np.linalg.norm(np.asarray(x - rest)) / 1e-2
        assert (growth > 1.0) == grows, (times, growth)
