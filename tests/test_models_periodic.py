"""Physics options of the force models: the zero-net-force projection and the periodic ADAPT."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.geometry import get_distances

import bptt_mlip as bm
from bptt_mlip.workflow import model_io
from bptt_mlip import losses
from bptt_mlip.models import adapt, constraints, periodic
from bptt_mlip.relax import scan as relax_scan
from bptt_mlip.relax import step_rules
from bptt_mlip.training import checkpoint

CUBE = 7.0 * np.eye(3)
SKEWED = np.array([[7.0, 0.0, 0.0], [1.5, 7.0, 0.0], [0.5, 1.0, 7.0]])
CUTOFF = 3.3  # below half the smallest perpendicular width of both cells (checked in a test)
TINY_PERIODIC = dataclasses.replace(
    adapt.TINY, geometry="minimum_image", cutoff=CUTOFF, num_radial=6, pair_hidden=8
)
MIXED = ["Si", "C", "O", "Si", "Ge", "Si", "C", "Si"]


def corner_cluster(n: int, cell: np.ndarray, seed: int) -> np.ndarray:
    """n atoms (Å) of a noisy 2.3 Å simple-cubic cluster around the cell origin, wrapped into the
    cell, so that neighbours sit across cell faces from each other."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)[:n] * 2.3
    cart = grid - 1.15 + rng.normal(0.0, 0.15, grid.shape)
    frac = np.linalg.solve(cell.T, cart.T).T
    return (frac % 1.0) @ cell


def normalizer() -> adapt.Normalizer:
    """Non-trivial statistics (descriptor spreads of a mixed set, anisotropic force spreads)."""
    feats = np.asarray(bm.from_arrays([MIXED], [np.zeros((len(MIXED), 3))]).features[0])
    return adapt.fit_normalizer(np.zeros((len(MIXED), 3)), feats,
                                np.random.default_rng(0).normal(0.0, [0.5, 0.7, 0.6], (len(MIXED), 3)),
                                np.ones(len(MIXED), bool))


def batch(sizes=(5, 7), cells=(CUBE, SKEWED), max_atoms=None, seed=0, batch_size=None) -> bm.Structures:
    pos = [corner_cluster(n, c, seed + i) for i, (n, c) in enumerate(zip(sizes, cells))]
    return bm.from_arrays([MIXED[:n] for n in sizes], pos, list(cells), max_atoms=max_atoms, batch_size=batch_size)


@pytest.fixture(scope="module")
def periodic_model():
    params = adapt.init_params(TINY_PERIODIC, jax.random.PRNGKey(1))
    return params, jax.jit(adapt.make_force_fn(TINY_PERIODIC, normalizer()))


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ----------------------------------------------------------------------------- zero net force


def test_zero_net_force_wrapper_removes_the_mean_and_keeps_padding_zero():
    s = batch((3, 5), max_atoms=6, batch_size=3)  # padded atoms and one empty batch row
    raw = np.random.default_rng(0).normal(1.0, 1.0, s.positions.shape).astype(np.float32)
    raw = np.where(np.asarray(s.mask)[..., None], raw, 0.0)

    def force_fn(params, structures, key=None):
        return jnp.asarray(raw) * params

    projected = constraints.zero_net_force(force_fn)
    for out in (projected(2.0, s), projected(2.0, s, jax.random.PRNGKey(0))):  # inference and training forms
        out = np.asarray(out)
        for b, n in enumerate([3, 5]):
            expected = 2.0 * (raw[b, :n] - raw[b, :n].mean(0))
            np.testing.assert_allclose(out[b, :n], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[b, :n].sum(0), 0.0, atol=1e-5)
        assert np.all(out[~np.asarray(s.mask)] == 0.0)
        assert np.all(out[2] == 0.0)
    assert np.abs(raw[0, :3].sum(0)).max() > 0.1  # the raw forces did have a net force


def test_adapt_net_force_option_projects_and_free_stays_the_default():
    assert adapt.AdaptConfig().net_force == "free" and adapt.AdaptConfig().geometry == "cartesian"
    zero_cfg = dataclasses.replace(adapt.TINY, net_force="zero")
    params = adapt.init_params(adapt.TINY, jax.random.PRNGKey(0))
    s = batch((4, 6), max_atoms=8)
    free = np.asarray(adapt.make_force_fn(adapt.TINY, normalizer())(params, s))
    zero = np.asarray(adapt.make_force_fn(zero_cfg, normalizer())(params, s))
    train_zero = np.asarray(adapt.make_train_force_fn(zero_cfg, normalizer())(params, s, jax.random.PRNGKey(3)))
    mask = np.asarray(s.mask)
    assert np.abs(free[0, :4].sum(0)).max() > 1e-2  # the published model has a net force
    for b, n in enumerate([4, 6]):
        np.testing.assert_allclose(zero[b, :n], free[b, :n] - free[b, :n].mean(0), atol=1e-5)
        np.testing.assert_allclose(zero[b, :n].sum(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_zero, zero, atol=1e-6)
    assert np.all(zero[~mask] == 0.0)


def test_new_config_fields_round_trip_and_old_checkpoint_dicts_still_load():
    cfg = dataclasses.replace(TINY_PERIODIC, net_force="zero")
    d = checkpoint.config_to_dict(cfg)
    assert d["geometry"] == "minimum_image" and d["net_force"] == "zero" and d["cutoff"] == CUTOFF
    assert model_io.adapt_config_from_dict(d) == cfg
    old = {k: v for k, v in checkpoint.config_to_dict(adapt.SMALL).items()
           if k not in ("geometry", "net_force", "cutoff", "num_radial", "pair_hidden")}
    assert model_io.adapt_config_from_dict(old) == adapt.SMALL


def test_invalid_physics_options_are_rejected():
    with pytest.raises(ValueError, match="geometry"):
        adapt.AdaptConfig(geometry="spherical")
    with pytest.raises(ValueError, match="net_force"):
        adapt.AdaptConfig(net_force="half")
    with pytest.raises(ValueError, match="input_encoding"):
        adapt.AdaptConfig(geometry="minimum_image", input_encoding="xyz+fourier")


# ----------------------------------------------------------------------------- geometry


def test_minimum_image_displacements_match_ase():
    s = batch((5, 7))
    r = np.asarray(periodic.minimum_image_displacements(s.positions, s.cell))
    for b, n in enumerate([5, 7]):
        pos, cell = np.asarray(s.positions[b, :n], np.float64), np.asarray(s.cell[b], np.float64)
        vectors, _ = get_distances(pos, pos, cell=cell, pbc=True)  # vectors[i, j] = x_j - x_i, minimum image
        np.testing.assert_allclose(r[b, :n, :n], vectors, atol=1e-4)
    free = bm.from_arrays([["Si"] * 3], [np.array([[0.0, 0, 0], [9.0, 0, 0], [0, 2.0, 1.0]])])  # zero cell
    np.testing.assert_allclose(periodic.minimum_image_displacements(free.positions, free.cell)[0],
                               free.positions[0][None, :, :] - free.positions[0][:, None, :], atol=1e-6)


def test_cutoff_limit_is_half_the_smallest_cell_width():
    assert periodic.cutoff_limit(CUBE) == pytest.approx(3.5)
    assert periodic.cutoff_limit(np.zeros((3, 3))) == float("inf")
    # the skewed cell's widths are V / |a_j x a_k|; the limit is below the cube's and above the test cutoff
    assert CUTOFF < periodic.cutoff_limit(SKEWED) < 3.5


# ----------------------------------------------------------------------------- periodic ADAPT


def test_periodic_forces_sum_to_zero_and_padding_is_zero(periodic_model):
    params, force_fn = periodic_model
    s = batch((5, 7), max_atoms=8, batch_size=3)
    f = np.asarray(force_fn(params, s))
    mask = np.asarray(s.mask)
    assert np.abs(f[mask]).max() > 1e-3  # the test model's forces are not trivially zero
    np.testing.assert_allclose(f.sum(axis=1), 0.0, atol=1e-5)
    assert np.all(f[~mask] == 0.0)


def test_translating_all_atoms_changes_no_periodic_force(periodic_model):
    params, force_fn = periodic_model
    s = batch((5, 7))
    moved = s.replace(positions=s.positions + jnp.asarray([3.1, -12.7, 0.4]))
    np.testing.assert_allclose(force_fn(params, moved), force_fn(params, s), atol=2e-4)
    cartesian = adapt.make_force_fn(adapt.TINY, normalizer())
    p_cart = adapt.init_params(adapt.TINY, jax.random.PRNGKey(1))
    assert np.abs(cartesian(p_cart, moved) - cartesian(p_cart, s)).max() > 1e-3  # the published model is not


def test_wrapping_an_atom_across_a_face_changes_no_periodic_force(periodic_model):
    params, force_fn = periodic_model
    s = batch((5, 7))
    shift = np.zeros(s.positions.shape, np.float32)
    shift[0, 2] = CUBE[0] - CUBE[2]
    shift[1, 0] = SKEWED[1]
    shift[1, 4] = -SKEWED[0] + 2 * SKEWED[2]
    wrapped = s.replace(positions=s.positions + jnp.asarray(shift))
    np.testing.assert_allclose(force_fn(params, wrapped), force_fn(params, s), atol=2e-4)
    # the forces come from neighbours across faces: seen without the cell they differ
    no_cell = jnp.zeros_like(s.cell)
    assert np.abs(force_fn(params, s) - force_fn(params, s.replace(cell=no_cell))).max() > 1e-3


def test_rotating_structure_and_cell_rotates_the_periodic_forces(periodic_model):
    params, force_fn = periodic_model
    s = batch((5, 7))
    rot = jnp.asarray(rotation(4), jnp.float32)
    turned = s.replace(positions=s.positions @ rot.T, cell=s.cell @ rot.T)
    np.testing.assert_allclose(force_fn(params, turned), force_fn(params, s) @ rot.T, atol=2e-4)


def test_mixed_size_padded_batch_equals_each_structure_alone(periodic_model):
    params, force_fn = periodic_model
    s = batch((4, 7), max_atoms=8, batch_size=3)
    together = np.asarray(force_fn(params, s))
    for b, n in enumerate([4, 7]):
        alone = batch((n,), (CUBE, SKEWED)[b:b + 1], seed=b)
        np.testing.assert_allclose(together[b, :n], np.asarray(force_fn(params, alone))[0], atol=1e-5)


def test_force_fn_vmaps_over_stacked_positions(periodic_model):
    params, force_fn = periodic_model
    s = batch((4, 7), max_atoms=8)
    stacked = jnp.stack([s.positions, s.positions + 0.1 * s.mask[..., None]])
    out = jax.vmap(lambda x: force_fn(params, s.replace(positions=x)))(stacked)
    np.testing.assert_allclose(out[1], force_fn(params, s.replace(positions=stacked[1])), atol=1e-5)


def test_isolated_atom_feels_nothing_and_forces_are_continuous_at_the_cutoff(periodic_model):
    params, force_fn = periodic_model
    lone = np.array([[0.0, 0.0, 0.0], [2.3, 0.0, 0.0], [0.0, 2.3, 0.0], [3.5, 3.5, 3.5]])  # last atom far from all
    s = bm.from_arrays([["Si", "C", "O", "Si"]], [lone], [CUBE])
    f = np.asarray(force_fn(params, s))
    assert np.all(f[0, 3] == 0.0) and np.abs(f[0, :3]).max() > 1e-4

    def pair_force(d):
        return np.asarray(force_fn(params, bm.from_arrays([["Si", "C"]], [np.array([[0.0, 0, 0], [d, 0, 0]])])))

    inside, outside = pair_force(CUTOFF - 1e-3), pair_force(CUTOFF + 1e-3)
    assert np.all(outside == 0.0) and np.abs(inside).max() < 1e-4  # the envelope brings forces smoothly to 0


def test_train_force_fn_has_the_same_signature_and_uses_dropout():
    cfg = dataclasses.replace(TINY_PERIODIC, dropout=0.5)
    params = adapt.init_params(cfg, jax.random.PRNGKey(2))
    s = batch((5, 7))
    infer = adapt.make_force_fn(cfg, normalizer())(params, s)
    train = adapt.make_train_force_fn(cfg, normalizer())
    a, b = train(params, s, jax.random.PRNGKey(0)), train(params, s, jax.random.PRNGKey(1))
    assert np.abs(a - b).max() > 1e-4 and np.abs(a - infer).max() > 1e-4
    np.testing.assert_allclose(np.asarray(a).sum(axis=1), 0.0, atol=1e-4)


def test_gradients_in_params_and_positions_are_finite_with_padding(periodic_model):
    params, force_fn = periodic_model
    s = batch((4, 7), max_atoms=8, batch_size=3)  # padded atoms all sit at the origin, on top of each other

    def loss_params(p):
        return jnp.sum(force_fn(p, s) ** 2)

    def loss_positions(x):
        return jnp.sum(force_fn(params, s.replace(positions=x)) ** 2)

    g_params = jax.tree_util.tree_leaves(jax.grad(loss_params)(params))
    g_pos = np.asarray(jax.grad(loss_positions)(s.positions))
    assert all(np.all(np.isfinite(g)) for g in g_params)
    assert np.all(np.isfinite(g_pos)) and np.all(g_pos[~np.asarray(s.mask)] == 0.0)
    assert np.abs(g_pos).max() > 0.0


def test_positions_gradient_matches_finite_differences(periodic_model):
    params, force_fn = periodic_model
    s = batch((5,), (SKEWED,))
    direction = jnp.asarray(np.random.default_rng(5).normal(size=s.positions.shape), jnp.float32)

    def value(t):
        return jnp.sum(force_fn(params, s.replace(positions=s.positions + t * direction)) * direction)

    h = 1e-2
    numeric = (value(h) - value(-h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(value)(0.0), numeric, rtol=2e-2, atol=1e-4)


def test_bptt_gradient_through_a_short_rollout_is_finite(periodic_model):
    params, _ = periodic_model
    force_fn = adapt.make_force_fn(TINY_PERIODIC, normalizer())
    s = batch((4, 7), max_atoms=8, batch_size=3)
    target = s.positions + 0.05
    rule = step_rules.LearnableStep(init_step=0.02)
    cfg = relax_scan.RolloutConfig(max_frames=4, stop_rms=0.0, remat="frame")

    def loss(p):
        out = relax_scan.rollout(force_fn, rule, p, s, relax_scan.FrameModifiers(), cfg)
        return jnp.mean(losses.delta_q(out.positions, target, s.masses, s.mask)[:2])

    grads = jax.grad(loss)({"model": params, "step_rule": rule.init()})
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert np.abs(np.asarray(grads["step_rule"]["eta"])) > 0.0
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree_util.tree_leaves(grads["model"])) > 0.0
