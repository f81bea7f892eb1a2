"""Implicit and guided gradients at the fixed point (relax/implicit.py, training/implicit_steps.py).

Two small models: the Morse pair potential (conservative, invariant under rigid motions: its
fixed points need the "rigid" null modes) and a pinned direct-force model (Morse coupling plus
a non-symmetric pull of every atom to the nearest site of a 2.35 Å grid: no symmetry, no energy,
dF/dX not symmetric), whose fixed point is unique, so the implicit gradient is exact.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import relax
from bptt_mlip.models import potentials
from bptt_mlip.relax import implicit
from bptt_mlip.training import implicit_steps, optim, steps

SPACING = 2.35  # Å, the Morse r0 and the pinning grid
ANISOTROPY = jnp.array([1.0, 1.5, 2.0])
SHEAR = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def pinned_force_fn(params, s: bm.Structures) -> jnp.ndarray:
    """Morse forces plus ``-A s(x - shift)``, ``s`` a periodic sawtooth-like pull to the grid
    (``L/2pi sin(2pi x/L)``) and ``A = k diag(1, 1.5, 2) + w e_x e_y^T`` (not symmetric)."""
    pull = SPACING / (2 * jnp.pi) * jnp.sin(2 * jnp.pi * (s.positions - params["shift"]) / SPACING)
    a = params["k"] * jnp.diag(ANISOTROPY) + params["w"] * SHEAR
    forces = potentials.morse_force_fn(params["morse"], s) - pull @ a.T
    return jnp.where(s.mask[..., None], forces, 0.0)


def pinned_params(dtype=jnp.float32):
    model = {"morse": potentials.init_morse_params(depth=0.1), "k": 1.0, "w": 0.5, "shift": np.array([0.1, -0.1, 0.05])}
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), {"model": model, "step_rule": {}})


def grid_cluster(n: int, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)[:n] * SPACING
    return grid + rng.normal(0.0, noise, grid.shape)


def make_batch(noises=(0.05, 0.05), sizes=(4, 5), max_atoms=None, batch_size=None, dtype=jnp.float32, starts=None):
    """Relaxations of small Si clusters towards targets 0.05 Å away from their starts; optional
    padding to ``max_atoms`` atoms and ``batch_size`` rows (weight 0)."""
    starts = starts or [grid_cluster(n, i, z) for i, (n, z) in enumerate(zip(sizes, noises))]
    targets = [p + np.random.default_rng(10 + i).normal(0.0, 0.05, p.shape) for i, p in enumerate(starts)]
    species = [["Si"] * len(p) for p in starts]
    initial = bm.from_arrays(species, starts, max_atoms=max_atoms, batch_size=batch_size)
    target = bm.from_arrays(species, targets, max_atoms=max_atoms, batch_size=batch_size).positions
    weight = np.zeros(initial.batch_size, np.float32)
    weight[: len(starts)] = 1.0
    batch = bm.RelaxationBatch(initial=initial, target_positions=target, weight=jnp.asarray(weight))
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, batch)


RULE = relax.FixedStep(0.15)
TIGHT = dict(max_frames=300, stop_rms=1e-11, tol=1e-10, max_relative_residual=1e-6)  # float64 runs


def gradient_config(gradient="implicit", unroll_frames=0, max_frames=80, stop_rms=1e-4, guidance_weight=1.0,
                    **adjoint) -> implicit_steps.GradientConfig:
    bptt = steps.BPTTConfig(rollout=relax.RolloutConfig(max_frames=max_frames, stop_rms=stop_rms))
    return implicit_steps.GradientConfig(bptt=bptt, gradient=gradient, unroll_frames=unroll_frames,
                                         adjoint=implicit.AdjointConfig(**adjoint), guidance_weight=guidance_weight)


@functools.partial(jax.jit, static_argnums=(2, 3))
def loss_and_grad(params, batch, force_fn, config: implicit_steps.GradientConfig):
    """((loss, aux), grads) of the method ``config.gradient`` (BPTT through steps.bptt_loss)."""
    key = jax.random.key(0)
    if config.gradient == "bptt":
        return jax.value_and_grad(steps.bptt_loss, has_aux=True)(params, batch, force_fn, RULE, config.bptt, key)
    return jax.value_and_grad(implicit_steps.implicit_loss, has_aux=True)(params, batch, force_fn, RULE, config, key)


def assert_trees_close(a, b, rtol, atol=0.0):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
                           a, b)


def scaled(tree, factor):
    return jax.tree_util.tree_map(lambda x: factor * x, tree)


# ----------------------------------------------------------------------------- agreement with BPTT


def test_implicit_gradient_equals_bptt_on_a_tightly_converged_rollout():
    """Pinned direct-force model, float64, stop at 1e-11 Å of RMS movement (about 140 frames):
    both gradients agree to 1e-6 relative (measured: 1e-8)."""
    with jax.enable_x64(True):
        batch, params = make_batch(dtype=jnp.float64), pinned_params(jnp.float64)
        (_, aux), g_implicit = loss_and_grad(params, batch, pinned_force_fn, gradient_config(**TIGHT))
        _, g_bptt = loss_and_grad(params, batch, pinned_force_fn, gradient_config("bptt", **TIGHT))
        assert int(aux["converged"]) == 2 and int(aux["implicit_rows"]) == 2
        assert int(aux["implicit_unconverged_rollouts"]) == 0 and int(aux["implicit_unconverged_solves"]) == 0
        assert float(aux["implicit_residual"]) < 1e-6
        assert_trees_close(g_implicit, g_bptt, rtol=1e-6, atol=1e-9)


def test_morse_cluster_with_rigid_null_modes_matches_bptt_near_its_minimum():
    """Morse clusters are invariant under rigid motions: dF/dX is singular along translations and
    rotations. Started 0.01 Å (per component) from a minimum, the implicit gradient with those
    modes projected out agrees with BPTT to 2e-3 of its norm (measured 6e-4; 2e-3 at 0.02 Å and
    2.5e-4 at 0.005 Å: the end point's orientation depends on the path, a rotation the implicit
    gradient leaves out, and that dependence shrinks with the start's distance). Without the
    projection the singular solve fails and is reported, not used."""
    with jax.enable_x64(True):
        morse = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), potentials.init_morse_params())
        params = {"model": morse, "step_rule": {}}
        relaxed = relax.rollout(potentials.morse_force_fn, RULE, params, make_batch(dtype=jnp.float64).initial,
                                relax.FrameModifiers(), relax.RolloutConfig(max_frames=600, stop_rms=1e-11))
        rng = np.random.default_rng(5)
        starts = [np.asarray(relaxed.positions[b, :n]) + rng.normal(0, 0.01, (n, 3)) for b, n in enumerate((4, 5))]
        batch = make_batch(starts=starts, dtype=jnp.float64)
        tight = dict(max_frames=600, stop_rms=1e-11, tol=1e-10, max_relative_residual=1e-6)
        (_, aux), g_implicit = loss_and_grad(params, batch, potentials.morse_force_fn,
                                             gradient_config(null_modes="rigid", **tight))
        _, g_bptt = loss_and_grad(params, batch, potentials.morse_force_fn, gradient_config("bptt", **tight))
        assert int(aux["implicit_unconverged_solves"]) == 0
        implicit_vector, bptt_vector = (np.array([g["model"]["alpha"], g["model"]["r0"]]) for g in (g_implicit, g_bptt))
        assert np.linalg.norm(implicit_vector - bptt_vector) < 2e-3 * np.linalg.norm(bptt_vector)
        assert abs(float(g_implicit["model"]["depth"])) < 1e-8  # the minimum's geometry does not depend on D
        (_, aux), g_none = loss_and_grad(params, batch, potentials.morse_force_fn, gradient_config(**tight))
        assert int(aux["implicit_unconverged_solves"]) == 2
        assert all(float(x) == 0.0 for x in jax.tree_util.tree_leaves(g_none))


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
def test_direct_force_model_matches_finite_differences_of_the_end_point_loss(solver):
    with jax.enable_x64(True):
        batch, params = make_batch(dtype=jnp.float64), pinned_params(jnp.float64)
        config = gradient_config(solver=solver, **TIGHT)
        (_, aux), grads = loss_and_grad(params, batch, pinned_force_fn, config)
        assert int(aux["implicit_unconverged_solves"]) == 0

        def end_point_loss(p):
            return float(loss_and_grad(p, batch, pinned_force_fn, config)[0][1]["endpoint_loss"])

        leaves, treedef = jax.tree_util.tree_flatten(params)
        flat_grads = jax.tree_util.tree_leaves(grads)
        eps = 1e-4
        for i, leaf in enumerate(leaves):
            for j in range(leaf.size):
                bump = np.zeros(leaf.size)
                bump[j] = eps
                at = lambda sign: jax.tree_util.tree_unflatten(treedef, [
                    x + sign * bump.reshape(x.shape) if k == i else x for k, x in enumerate(leaves)])
                fd = (end_point_loss(at(1)) - end_point_loss(at(-1))) / (2 * eps)
                np.testing.assert_allclose(np.ravel(flat_grads[i])[j], fd, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- guided limits


def test_guided_with_the_whole_rollout_as_window_is_bptt():
    batch, params = make_batch(), pinned_params()
    (loss_b, aux_b), g_b = loss_and_grad(params, batch, pinned_force_fn, gradient_config("bptt"))
    for window in (80, 60):  # 60: every structure has converged inside the window (about 40 frames)
        (loss_g, aux_g), g_g = loss_and_grad(params, batch, pinned_force_fn, gradient_config("guided", window))
        np.testing.assert_allclose(loss_g, loss_b, rtol=1e-6)
        assert_trees_close(g_g, g_b, rtol=1e-6, atol=1e-9)
        assert float(aux_g["frames"]) == float(aux_b["frames"]) and int(aux_g["converged"]) == 2
        assert int(aux_g["implicit_rows"]) == 0


def test_guided_without_window_is_pure_implicit():
    batch, params = make_batch(), pinned_params()
    (loss_i, aux_i), g_i = loss_and_grad(params, batch, pinned_force_fn, gradient_config("implicit"))
    (loss_g, aux_g), g_g = loss_and_grad(params, batch, pinned_force_fn, gradient_config("guided", 0))
    np.testing.assert_array_equal(loss_g, loss_i)
    assert_trees_close(g_g, g_i, rtol=0.0)
    assert {k: float(v) for k, v in aux_g.items()} == {k: float(v) for k, v in aux_i.items()}


def test_guided_window_adds_only_its_guidance_term():
    """With no null modes the fixed point forgets X_W: guided without guidance is the implicit
    gradient; the guidance adds exactly the BPTT gradient of the end-point loss after W frames."""
    batch, params = make_batch(), pinned_params()
    _, g_implicit = loss_and_grad(params, batch, pinned_force_fn, gradient_config("implicit"))
    _, g_plain = loss_and_grad(params, batch, pinned_force_fn, gradient_config("guided", 10, guidance_weight=0.0))
    (_, aux1), g_guided = loss_and_grad(params, batch, pinned_force_fn, gradient_config("guided", 10))
    window_bptt = implicit_steps.GradientConfig(bptt=steps.BPTTConfig(rollout=relax.RolloutConfig(10, stop_rms=1e-4)))
    (loss_w, _), g_window = loss_and_grad(params, batch, pinned_force_fn, window_bptt)
    assert int(aux1["implicit_rows"]) == 2 and int(aux1["implicit_unconverged_solves"]) == 0
    assert_trees_close(g_plain, g_implicit, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(aux1["guidance_loss"], loss_w, rtol=1e-6)
    difference = jax.tree_util.tree_map(jnp.subtract, g_guided, g_plain)
    assert_trees_close(difference, g_window, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the documented paths


def test_unconverged_rollout_gets_zero_gradient_and_is_counted():
    """Row 0 starts 0.01 Å from its fixed point (converges in ~30 frames at 1e-4 Å), row 1 0.6 Å
    away (needs more than 40): with 40 frames row 1 takes the documented path: zero gradient, in
    the loss, counted. Reference: the same batch with row 1 weighted 0 (row 0 alone)."""
    batch = make_batch(noises=(0.01, 0.6))
    alone = batch.replace(weight=jnp.asarray([1.0, 0.0]))
    params, config = pinned_params(), gradient_config(max_frames=40)
    (loss, aux), grads = loss_and_grad(params, batch, pinned_force_fn, config)
    (loss_alone, aux_alone), grads_alone = loss_and_grad(params, alone, pinned_force_fn, config)
    assert int(aux["converged"]) == 1 and int(aux["implicit_unconverged_rollouts"]) == 1
    assert int(aux_alone["implicit_unconverged_rollouts"]) == 0 and int(aux_alone["implicit_rows"]) == 1
    assert float(loss) > 0.5 * float(loss_alone)  # the unconverged row stays in the reported loss
    assert_trees_close(grads, scaled(grads_alone, 0.5), rtol=1e-5, atol=1e-8)  # batch mean over 2 rows


@pytest.mark.parametrize("gradient,window", [("implicit", 0), ("guided", 10)])
def test_padded_atoms_and_rows_change_nothing(gradient, window):
    params, config = pinned_params(), gradient_config(gradient, window)
    (loss, aux), grads = loss_and_grad(params, make_batch(), pinned_force_fn, config)
    (loss_p, aux_p), grads_p = loss_and_grad(params, make_batch(max_atoms=8, batch_size=3), pinned_force_fn, config)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    assert_trees_close(grads_p, grads, rtol=1e-4, atol=1e-7)
    for name in ("implicit_rows", "implicit_unconverged_rollouts", "implicit_unconverged_solves", "converged"):
        assert int(aux_p[name]) == int(aux[name]), name


# ----------------------------------------------------------------------------- pieces and the trainer


def test_null_mode_basis_is_orthonormal_and_periodic_rows_keep_translations_only():
    s = make_batch(max_atoms=6).initial
    s = s.replace(cell=s.cell.at[1].set(10.0 * jnp.eye(3)))
    basis = implicit.null_mode_basis(s, "rigid")
    gram = jnp.einsum("bmni,bkni->bmk", basis, basis)
    np.testing.assert_allclose(gram[0], np.eye(6), atol=1e-5)
    np.testing.assert_allclose(gram[1], np.diag([1, 1, 1, 0, 0, 0]), atol=1e-5)
    assert float(jnp.max(jnp.abs(jnp.where(s.mask[:, None, :, None], 0.0, basis)))) == 0.0
    field = jnp.asarray(np.random.default_rng(0).normal(size=s.positions.shape), jnp.float32)
    kept = implicit.remove_null_modes(field, implicit.null_mode_basis(s, "translations"), s.mask)
    np.testing.assert_allclose(jnp.sum(kept, axis=1), 0.0, atol=1e-5)  # zero mean over real atoms
    assert float(jnp.max(jnp.abs(jnp.where(s.mask[..., None], 0.0, kept)))) == 0.0


def test_trainer_updates_the_model_but_not_the_step_rule():
    batch, params = make_batch(), pinned_params()
    rule = relax.LearnableStep(0.15)
    params = {"model": params["model"], "step_rule": rule.init()}
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2))
    trainer = implicit_steps.make_implicit_trainer(pinned_force_fn, rule, gradient_config(), optimizer)
    state, metrics = trainer.update(trainer.init(params, jax.random.key(1)), batch)
    for name in ("loss", "endpoint_loss", "implicit_rows", "implicit_unconverged_rollouts",
                 "implicit_unconverged_solves", "implicit_residual", "grad_norm"):
        assert np.isfinite(float(metrics[name])), name
    assert float(state.params["model"]["k"]) != float(params["model"]["k"])
    assert float(state.params["step_rule"]["eta"]) == float(params["step_rule"]["eta"])


def test_configuration_errors_name_the_setting():
    with pytest.raises(ValueError, match="unroll_frames"):
        gradient_config("implicit", 5)
    with pytest.raises(ValueError, match="unroll_frames"):
        gradient_config("guided", 81)
    with pytest.raises(ValueError, match="gradient"):
        gradient_config("adjoint")
    with pytest.raises(ValueError, match="solver"):
        implicit.AdjointConfig(solver="lu")
    with pytest.raises(ValueError, match="null_modes"):
        dataclasses.replace(implicit.AdjointConfig(), null_modes="rotations")
