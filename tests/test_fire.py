"""bptt_mlip.fire against ASE's own FIRE (ase.optimize.FIRE), frame by frame, in float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.optimize import FIRE

from bptt_mlip.relax import fire

POS_TOL = 1e-8  # Å, float64 agreement with ASE over a whole trajectory


@pytest.fixture(autouse=True, scope="module")
def _x64():
    # Global (not the thread-local context manager): pure_callback runs in another thread.
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# --- a small pure-JAX Lennard-Jones potential (sigma = epsilon = 1, no cutoff) --------------


def lj_energy(positions: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] energies of padded clusters; padding pairs are excluded with safe distances."""
    n = positions.shape[1]
    diff = positions[:, :, None, :] - positions[:, None, :, :]
    r2 = jnp.sum(diff * diff, axis=-1)
    pair = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    inv6 = (1.0 / jnp.where(pair, r2, 1.0)) ** 3
    e = jnp.where(pair, 4.0 * (inv6 * inv6 - inv6), 0.0)
    return 0.5 * jnp.sum(e, axis=(1, 2))


def lj_forces(positions: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return -jax.grad(lambda x: jnp.sum(lj_energy(x, mask)))(positions)


_lj_energy_forces_one = jax.jit(
    lambda x: (lj_energy(x[None], jnp.ones(x.shape[:1], bool)[None])[0],
               lj_forces(x[None], jnp.ones(x.shape[:1], bool)[None])[0])
)


class JaxLJ(Calculator):
    """The same jnp Lennard-Jones wrapped as an ASE calculator."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        e, f = _lj_energy_forces_one(jnp.asarray(self.atoms.get_positions(), jnp.float64))
        self.results = {"energy": float(e), "forces": np.asarray(f, np.float64)}


def relax(force_fn, positions, mask, config, return_trajectory=False):
    """fire_relax under jax.jit (the way it is meant to be used; eager mode compiles op by op)."""
    return jax.jit(lambda x, m: fire.fire_relax(force_fn, x, m, config, return_trajectory=return_trajectory))(
        positions, mask)


def cluster(n: int, seed: int, rattle: float = 0.15) -> np.ndarray:
    """n atoms taken from a simple-cubic grid near the LJ distance, rattled."""
    rng = np.random.default_rng(seed)
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)], float)
    grid = grid[np.argsort(np.linalg.norm(grid - 1.0, axis=1), kind="stable")][:n]
    return 1.15 * grid + rattle * rng.standard_normal((n, 3))


def ase_fire(atoms: Atoms, config: fire.FireConfig) -> tuple[np.ndarray, int, bool]:
    """Run ASE FIRE; return its frames [nsteps+1, n, 3], nsteps and the converged flag."""
    frames = []
    opt = FIRE(atoms, logfile=None, dt=config.dt, maxstep=config.maxstep, dtmax=config.dtmax,
               Nmin=config.n_min, finc=config.f_inc, fdec=config.f_dec, astart=config.a_start,
               fa=config.f_a, a=config.a_start)
    opt.attach(lambda: frames.append(atoms.get_positions().copy()))
    converged = opt.run(fmax=config.fmax, steps=config.max_steps)
    return np.stack(frames), opt.nsteps, bool(converged)


def check_against_ase(traj_b, state, b, ref_frames, ref_nsteps, ref_conv, n_atoms):
    """Frames of structure b agree with ASE, then repeat the final frame; padding never moves."""
    assert int(state.num_frames[b]) == ref_nsteps
    assert bool(state.converged[b]) == ref_conv
    traj_b = np.asarray(traj_b)
    err = np.max(np.abs(traj_b[: ref_nsteps + 1, :n_atoms] - ref_frames))
    assert err < POS_TOL, err
    np.testing.assert_array_equal(traj_b[ref_nsteps:], np.broadcast_to(traj_b[ref_nsteps], traj_b[ref_nsteps:].shape))
    np.testing.assert_array_equal(traj_b[:, n_atoms:], np.broadcast_to(traj_b[0, n_atoms:], traj_b[:, n_atoms:].shape))
    return err


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        fire.FireConfig(fmax=0.01, max_steps=300),  # converges (n_pos > n_min, dt growth, resets)
        fire.FireConfig(fmax=1e-6, max_steps=25),  # hits max_steps: converged=False
    ],
    ids=["converges", "max_steps"],
)
def test_matches_ase_fire_lennard_jones_batch(config):
    """A padded batch of two LJ clusters (+ an all-padding row) agrees with ASE on each alone."""
    sizes = (9, 6)
    n_max = 11
    starts = [cluster(n, seed) for n, seed in zip(sizes, (0, 1))]
    pos = np.zeros((3, n_max, 3))
    mask = np.zeros((3, n_max), bool)
    for b, p in enumerate(starts):
        pos[b, : len(p)] = p
        mask[b, : len(p)] = True
    pos[:, n_max - 1] = 0.5  # padding at a nonzero place, even on top of nothing: must not move
    mask_j = jnp.asarray(mask)
    force_fn = functools.partial(lj_forces, mask=mask_j)

    state, traj = relax(force_fn, jnp.asarray(pos), mask_j, config, return_trajectory=True)
    assert traj.shape == (config.max_steps + 1, 3, n_max, 3)
    assert traj.dtype == jnp.float64

    errs = []
    for b, p in enumerate(starts):
        atoms = Atoms("Ar" * len(p), positions=p)
        atoms.calc = JaxLJ()
        ref_frames, ref_nsteps, ref_conv = ase_fire(atoms, config)
        if config.max_steps == 25:
            assert ref_nsteps == 25 and not ref_conv
        else:
            assert ref_conv and ref_nsteps > 2 * config.n_min
        errs.append(check_against_ase(traj[:, b], state, b, ref_frames, ref_nsteps, ref_conv, len(p)))
    print(f"LJ {config}: n_steps={np.asarray(state.num_frames)}, max |dx| vs ASE={max(errs):.2e}")

    # The all-padding row is converged at once and never steps.
    assert bool(state.converged[2]) and int(state.num_frames[2]) == 0
    np.testing.assert_array_equal(np.asarray(traj[:, 2]), np.broadcast_to(pos[2], traj[:, 2].shape))
    np.testing.assert_array_equal(np.asarray(state.velocities)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(state.forces)[~mask], 0.0)

    if config.max_steps == 25:
        return
    # The while_loop path (no trajectory) ends in the same state.
    state_w, none = relax(force_fn, jnp.asarray(pos), mask_j, config)
    assert none is None
    for field in ("positions", "velocities", "dt", "a", "n_pos", "converged", "num_frames"):
        np.testing.assert_array_equal(np.asarray(getattr(state_w, field)), np.asarray(getattr(state, field)),
                                      err_msg=field)


def test_padded_batch_equals_unpadded_alone():
    """Each structure relaxed inside a padded batch == the same structure alone, unpadded."""
    config = fire.FireConfig(fmax=0.02, max_steps=150)
    starts = [cluster(7, 3), cluster(4, 4)]
    n_max = 9
    pos = np.zeros((2, n_max, 3))
    mask = np.zeros((2, n_max), bool)
    for b, p in enumerate(starts):
        pos[b, : len(p)] = p
        mask[b, : len(p)] = True
    # force_fn returns garbage (NaN) on padded atoms: it must be ignored.
    def noisy(x, m):
        return jnp.where(m[..., None], lj_forces(x, m), jnp.nan)

    run = jax.jit(lambda x, m: fire.fire_relax(functools.partial(noisy, m=m), x, m, config))
    batch, _ = run(jnp.asarray(pos), jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(batch.positions)))
    np.testing.assert_array_equal(np.asarray(batch.positions)[~mask], pos[~mask])
    for b, p in enumerate(starts):
        alone, _ = run(jnp.asarray(p)[None], jnp.ones((1, len(p)), bool))
        assert int(alone.num_frames[0]) == int(batch.num_frames[b]) > 0
        assert bool(alone.converged[0]) and bool(batch.converged[b])
        np.testing.assert_allclose(np.asarray(batch.positions[b, : len(p)]), np.asarray(alone.positions[0]),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(batch.dt[b]), np.asarray(alone.dt[0]), rtol=1e-12)
        assert int(batch.n_pos[b]) == int(alone.n_pos[0])


def test_converged_structures_are_frozen_and_step_is_jittable():
    """fire_step leaves converged (and out-of-steps) structures bit-for-bit unchanged."""
    config = fire.FireConfig(fmax=0.05, max_steps=3)
    # Row 0: an LJ dimer at its minimum (plus 3 padded atoms), converged from the start.
    pos = np.zeros((2, 5, 3))
    pos[0, 1, 0] = 2.0 ** (1.0 / 6.0)
    pos[0, 2:] = 0.3
    pos[1] = cluster(5, 6)
    pos = jnp.asarray(pos)
    mask = jnp.asarray([[True, True, False, False, False], [True] * 5])
    force_fn = functools.partial(lj_forces, mask=mask)
    step = jax.jit(lambda s: fire.fire_step(force_fn, s, mask, config))
    s0 = jax.jit(lambda x: fire.fire_init(force_fn, x, mask, config))(pos)
    assert np.asarray(s0.converged).tolist() == [True, False]
    states = [s0]
    for _ in range(5):
        states.append(step(states[-1]))
    for s in states[1:]:
        for field in ("positions", "velocities", "forces", "dt", "a", "n_pos", "converged", "num_frames"):
            np.testing.assert_array_equal(np.asarray(getattr(s, field))[0], np.asarray(getattr(s0, field))[0])
    # The unconverged one took exactly max_steps steps, then froze, and reports converged=False.
    assert [int(s.num_frames[1]) for s in states] == [0, 1, 2, 3, 3, 3]
    assert not bool(states[-1].converged[1])
    np.testing.assert_array_equal(np.asarray(states[-1].positions), np.asarray(states[3].positions))
    # First step mirrors ASE (vel=None -> v=0): dt/a/n_pos untouched, v = dt F, dx = dt^2 F.
    np.testing.assert_allclose(np.asarray(states[1].velocities[1]), 0.1 * np.asarray(s0.forces[1]), rtol=1e-14)
    assert float(states[1].dt[1]) == 0.1 and int(states[1].n_pos[1]) == 0


def test_maxstep_clips_whole_displacement_norm_and_zero_force_is_safe():
    """ASE clips the norm of the whole dr (all atoms), not each atom; v is not rescaled.

    Row 1 has zero force and fmax=0, so it never converges: v = 0 and F = 0 must give no NaN.
    """
    config = fire.FireConfig(dt=1.0, maxstep=0.2, fmax=0.0, max_steps=3)
    f = np.zeros((2, 3, 3))
    f[0, 0] = [1.0, 0.0, 0.0]  # |dr| = dt^2 |F| > 0.2 -> clipped to 0.2 as a whole
    f[0, 1] = [0.0, 0.5, 0.0]
    state, traj = relax(lambda x: jnp.asarray(f), jnp.zeros((2, 3, 3)), jnp.ones((2, 3), bool), config,
                        return_trajectory=True)
    dr = np.asarray(traj[1, 0])
    np.testing.assert_allclose(np.linalg.norm(dr), 0.2, rtol=1e-14)
    np.testing.assert_allclose(dr, 0.2 * f[0] / np.linalg.norm(f[0]), rtol=1e-14)
    assert np.linalg.norm(dr[0]) < 0.19  # a per-atom clip would give 0.2 for each atom
    assert np.asarray(state.num_frames).tolist() == [3, 3] and not np.any(np.asarray(state.converged))
    assert np.all(np.isfinite(np.asarray(traj))) and np.all(np.isfinite(np.asarray(state.velocities)))
    np.testing.assert_array_equal(np.asarray(traj[:, 1]), 0.0)


def test_matches_ase_fire_emt_copper():
    """Same trajectory as ASE FIRE with ASE's EMT on a rattled periodic Cu cell (callback forces)."""
    atoms0 = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms0.rattle(stdev=0.08, seed=7)
    config = fire.FireConfig(fmax=0.02, max_steps=200)

    atoms = atoms0.copy()
    atoms.calc = EMT()
    ref_frames, ref_nsteps, ref_conv = ase_fire(atoms, config)
    assert ref_conv

    calc_atoms = atoms0.copy()
    calc_atoms.calc = EMT()

    def emt_forces_np(x):
        out = np.zeros_like(x)
        for b in range(x.shape[0]):
            calc_atoms.set_positions(x[b])
            out[b] = calc_atoms.get_forces()
        return out

    def force_fn(x):
        return jax.pure_callback(emt_forces_np, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    n = len(atoms0)
    state, traj = relax(force_fn, jnp.asarray(atoms0.get_positions())[None], jnp.ones((1, n), bool),
                        config, return_trajectory=True)
    err = check_against_ase(traj[:, 0], state, 0, ref_frames, ref_nsteps, ref_conv, n)
    print(f"EMT Cu{n}: n_steps={ref_nsteps}, max |dx| vs ASE={err:.2e}")


# --- the cached runner for a model's force_fn(params, structures), and the FIRE table ------------


def _lj_model(scale, structures):
    """A ``force_fn(params, structures)``: Lennard-Jones forces times the parameter ``scale``."""
    return scale * lj_forces(structures.positions, structures.mask)


def test_make_fire_runner_is_cached_and_equals_fire_relax():
    import bptt_mlip as bm

    config = fire.FireConfig(fmax=0.02, max_steps=120)
    assert fire.make_fire_runner(_lj_model, config) is fire.make_fire_runner(_lj_model, config)
    s = bm.from_arrays([["Si"] * 6, ["Si"] * 4], [cluster(6, 5), cluster(4, 6)], max_atoms=8)
    end = fire.make_fire_runner(_lj_model, config)(1.0, s)
    state, _ = relax(lambda x: lj_forces(x, s.mask), s.positions, s.mask, config)
    for field in ("positions", "num_frames", "converged"):
        np.testing.assert_array_equal(np.asarray(getattr(end.state, field)), np.asarray(getattr(state, field)))
    f = np.asarray(end.state.forces, np.float64)
    by_hand = [np.linalg.norm(f[b, : n], axis=-1).max() for b, n in enumerate((6, 4))]
    np.testing.assert_allclose(np.asarray(end.max_force), by_hand, rtol=1e-6)
    assert not np.any(np.asarray(end.diverged)) and end.trajectory is None
    blown = fire.make_fire_runner(lambda p, st: jnp.full_like(st.positions, jnp.nan), config)(1.0, s)
    assert np.all(np.asarray(blown.diverged))


def test_fire_table_drops_padding_rows_and_equals_each_structure_alone():
    from bptt_mlip import losses
    from bptt_mlip.data.trajectory import make_trajectory
    from bptt_mlip.training import evaluate

    config = fire.FireConfig(fmax=0.02, max_steps=150)
    sizes = (6, 4, 5)
    trajs = [make_trajectory([14] * n, np.stack([cluster(n, 10 + i), cluster(n, 10 + i, rattle=0.0)]),
                             traj_id=f"c{i}") for i, n in enumerate(sizes)]
    summary, per = evaluate.fire_table(_lj_model, 1.0, trajs, config, batch_size=2, buckets=(8,))
    assert per["dq"].shape == (3,) and summary["num_structures"] == 3  # the padding row of batch 2 is gone
    assert evaluate.make_fire_eval(_lj_model, config) is evaluate.make_fire_eval(_lj_model, config)
    by_id = {}
    for t in trajs:  # each alone, unpadded, in its own batch of one
        s = bm_structures(t)
        state, _ = relax(lambda x, s=s: lj_forces(x, s.mask), s.positions, s.mask, config)
        target = jnp.asarray(t.positions[-1], s.positions.dtype)[None]
        dq = losses.delta_q(state.positions, target, s.masses, s.mask)
        by_id[t.traj_id] = (int(state.num_frames[0]), float(dq[0]))
    # relaxation_batches keeps the order within a bucket: c0, c1 | c2
    for k, t in enumerate(trajs):
        frames, dq = by_id[t.traj_id]
        assert int(per["num_frames"][k]) == frames
        assert per["dq"][k] == pytest.approx(dq, rel=1e-5)


def bm_structures(traj):
    import bptt_mlip as bm

    return bm.from_arrays([traj.species], [traj.positions[0]])
