"""The largest-force stop of the rollout and relaxation settings derived from training trajectories."""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_mlip as bm
from bptt_mlip import losses, relax
from bptt_mlip.data.batching import make_relaxation_batch
from bptt_mlip.data.relax_settings import RelaxSettings, derive_relax_settings, lsq_steps, step_grid
from bptt_mlip.data.trajectory import Trajectory
from bptt_mlip.models import potentials
from bptt_mlip.relax import fire
from bptt_mlip.workflow import api

NO_MODIFIERS = relax.FrameModifiers()
K = 2.0  # eV/Å², stiffness of the harmonic wells
ETA = 0.1  # Å²/eV: every frame multiplies the distance to the well's centre by 1 - ETA K = 0.8


# ----------------------------------------------------------------------------- the largest-force stop


def _wells(largest_offsets, max_atoms=3):
    """Structures of 3 Si atoms each, and their well centres: atom 0 sits ``largest`` Å from its
    centre (the largest force K * largest), atoms 1 and 2 at half and a quarter of that."""
    rng = np.random.default_rng(0)
    centres, starts = [], []
    for largest in largest_offsets:
        c = rng.uniform(0.0, 5.0, (3, 3))
        direction = rng.normal(size=(3, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        centres.append(c)
        starts.append(c + direction * np.array([1.0, 0.5, 0.25])[:, None] * largest)
    s = bm.from_arrays([["Si"] * 3] * len(starts), starts, max_atoms=max_atoms)
    centre = np.zeros(s.positions.shape, np.float32)
    centre[:, :3] = np.stack(centres)
    return s, jnp.asarray(centre)


def well_forces(params, s):
    """-K (X - centre) on real atoms; a huge fake force on padded atoms (the stop must ignore it)."""
    return jnp.where(s.mask[..., None], -K * (s.positions - params["centre"]), 1e3)


def _run(s, centre, cfg, eta=ETA):
    params = {"model": {"centre": centre}, "step_rule": {"eta": jnp.asarray(eta)}}
    return relax.rollout(well_forces, relax.LearnableStep(), params, s, NO_MODIFIERS, cfg)


def test_force_stop_is_at_the_first_frame_below_stop_fmax():
    # largest force K * largest * 0.8^t; stop_fmax 0.3 eV/Å:
    # 1.0 * 0.8^t < 0.3 first at t = 6 (0.8^5 = 0.328, 0.8^6 = 0.262); 0.4 * 0.8^t first at t = 2;
    # 0.2 < 0.3 already at the start: 0 frames.
    s, centre = _wells([0.5, 0.2, 0.1])
    cfg = relax.RolloutConfig(max_frames=20, stop_rms=0.0, stop_fmax=0.3)
    r = _run(s, centre, cfg)
    np.testing.assert_array_equal(np.asarray(r.num_frames), [6, 2, 0])
    assert bool(jnp.all(r.converged)) and not bool(jnp.any(r.diverged))
    expected = centre + (0.8 ** np.array([6, 2, 0]))[:, None, None] * (s.positions - centre)
    np.testing.assert_allclose(np.asarray(r.positions), np.asarray(expected), atol=1e-6)
    # the stop is not differentiated: d X_end / d eta = -t K (1 - eta K)^(t-1) (X_0 - c) with t frozen at 6
    grad = jax.grad(lambda e: jnp.sum(_run(s, centre, cfg, e).positions[0]))(ETA)
    hand = -6 * K * 0.8**5 * float(jnp.sum(s.positions[0] - centre[0]))
    np.testing.assert_allclose(float(grad), hand, rtol=1e-4)
    # the same stop under rematerialised segments of frames
    seg = _run(s, centre, relax.RolloutConfig(max_frames=20, stop_rms=0.0, stop_fmax=0.3, remat="segment"))
    np.testing.assert_array_equal(np.asarray(seg.num_frames), [6, 2, 0])
    np.testing.assert_array_equal(np.asarray(seg.positions), np.asarray(r.positions))


def test_force_stop_ignores_padded_atoms_and_checks_the_end_positions():
    s, centre = _wells([0.5, 0.2])
    sp, centre_p = _wells([0.5, 0.2], max_atoms=7)  # padded atoms carry a fake force of 1e3 eV/Å
    cfg = relax.RolloutConfig(max_frames=20, stop_rms=0.0, stop_fmax=0.3)
    r, rp = _run(s, centre, cfg), _run(sp, centre_p, cfg)
    np.testing.assert_array_equal(np.asarray(rp.num_frames), [6, 2])
    np.testing.assert_array_equal(np.asarray(rp.num_frames), np.asarray(r.num_frames))
    np.testing.assert_allclose(np.asarray(rp.positions[:, :3]), np.asarray(r.positions), atol=1e-6)
    # the forces fall below stop_fmax right after the last allowed frame: converged, 6 frames
    end = _run(s, centre, relax.RolloutConfig(max_frames=6, stop_rms=0.0, stop_fmax=0.3))
    assert bool(end.converged[0]) and int(end.num_frames[0]) == 6
    short = _run(s, centre, relax.RolloutConfig(max_frames=5, stop_rms=0.0, stop_fmax=0.3))
    assert not bool(short.converged[0]) and int(short.num_frames[0]) == 5


def test_stop_fmax_zero_changes_nothing_and_is_validated():
    s, centre = _wells([0.5, 0.2, 0.1])
    off = _run(s, centre, relax.RolloutConfig(max_frames=12, stop_rms=0.0))
    np.testing.assert_array_equal(np.asarray(off.num_frames), [12, 12, 12])
    assert not bool(jnp.any(off.converged))
    # a rule that never fires leaves value and gradient exactly as without it
    never = relax.RolloutConfig(max_frames=12, stop_rms=1e-3, stop_fmax=1e-12)
    plain = relax.RolloutConfig(max_frames=12, stop_rms=1e-3)
    a, b = _run(s, centre, never), _run(s, centre, plain)
    np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))
    np.testing.assert_array_equal(np.asarray(a.num_frames), np.asarray(b.num_frames))
    ga = jax.grad(lambda e: jnp.sum(_run(s, centre, never, e).positions))(ETA)
    gb = jax.grad(lambda e: jnp.sum(_run(s, centre, plain, e).positions))(ETA)
    assert float(ga) == float(gb)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stop_fmax must be a finite force >= 0"):
            relax.RolloutConfig(stop_fmax=bad)


def test_relax_structures_passes_stop_fmax():
    # every atom pulled to its nearest point of a 3 Å lattice; the farthest is 0.5 Å away, so the
    # largest force is K 0.5 0.8^t = 0.8^t
    atoms = ase.Atoms("Si3", positions=[[3.5, 0.0, 0.0], [0.0, 3.25, 0.0], [0.0, 0.0, -0.1]])
    lattice_wells = lambda params, s: jnp.where(  # noqa: E731
        s.mask[..., None], -K * (s.positions - 3.0 * jnp.round(s.positions / 3.0)), 0.0)
    out = api.relax_structures(atoms, lattice_wells, params={}, step_size=ETA, stop_rms=0.0, stop_fmax=0.3)
    assert int(out.num_frames[0]) == 6 and bool(out.converged[0])
    assert float(out.max_force[0]) < 0.3 < 0.8**5 * K * 0.5 + 1e-9


# ----------------------------------------------------------------------------- derived settings


def _traj(positions, forces, tid="t"):
    positions, forces = np.asarray(positions, float), np.asarray(forces, float)
    n = positions.shape[1]
    return Trajectory(species=np.full(n, 14, np.int32), cell=None, pbc=(False, False, False),
                      positions=positions, forces=forces, source="test", traj_id=tid)


def _stepped(steps, force_sizes, n=4, seed=0):
    """A trajectory whose frame t moves every atom by steps[t] * F_t, with |F_tj| = force_sizes[t] for
    every atom (so frame t's RMS movement is steps[t] * force_sizes[t] and its largest force force_sizes[t])."""
    rng = np.random.default_rng(seed)
    x = [rng.uniform(0, 6, (n, 3))]
    forces = []
    for t, f in enumerate(force_sizes):
        unit = rng.normal(size=(n, 3))
        forces.append(f * unit / np.linalg.norm(unit, axis=-1, keepdims=True))
        if t < len(steps):
            x.append(x[-1] + steps[t] * forces[-1])
    return _traj(x, forces, tid=f"s{seed}")


def test_derived_settings_recover_the_least_squares_step_and_movements():
    a = _stepped([0.1, 0.2, 0.6], [1.0, 0.5, 0.2, 0.05], seed=1)         # per-trajectory median step 0.2
    b = _stepped([0.3, 0.3], [0.8, 0.4, 0.03], seed=2)                   # 0.3
    c = _stepped([0.05, 0.5, 0.7, 0.9], [2.0, 1.0, 0.5, 0.3, 0.04], seed=3)  # median of 0.5, 0.7: 0.6
    np.testing.assert_allclose(lsq_steps(a.positions, a.forces), [0.1, 0.2, 0.6], rtol=1e-12)
    s = derive_relax_settings([a, b, c])
    np.testing.assert_allclose(s.lsq_step, 0.3, rtol=1e-12)
    assert s.grid_steps[0] < 0.3 < s.grid_steps[-1] and len(s.grid_steps) == 11
    np.testing.assert_allclose(s.grid_steps[5], 0.3, rtol=1e-12)
    np.testing.assert_allclose([s.grid_steps[0], s.grid_steps[-1]], [0.03, 3.0], rtol=1e-12)
    # last-frame movements 0.6 * 0.2, 0.3 * 0.4, 0.9 * 0.3 -> median 0.12; first 0.1, 0.24, 0.1 -> 0.1
    np.testing.assert_allclose([s.last_frame_rms, s.first_frame_rms], [0.12, 0.1], rtol=1e-12)
    np.testing.assert_allclose(s.stop_rms, 0.15 * 0.12, rtol=1e-12)
    # largest forces: first frames 1.0, 0.8, 2.0 -> 1.0; last frames 0.05, 0.03, 0.04 -> 0.04
    np.testing.assert_allclose([s.force_scale, s.final_fmax, s.stop_fmax, s.fire_fmax], [1.0, 0.04, 0.04, 0.04],
                               rtol=1e-12)
    assert s.num_trajectories == 3 and s.num_frames == 9 and s.clamps == ()
    assert RelaxSettings.from_dict(s.to_dict()) == s
    text = s.describe()
    assert "0.018 Å" in text and "0.04 eV/Å" in text and "0.03..3 Å²/eV" in text and "0.3 Å²/eV" in text


def test_derived_settings_clamp_and_skip():
    # last frames move more than the first: stop_rms capped at half the first-frame movement
    a = _stepped([0.1, 2.0], [1.0, 1.0, 0.01], seed=1)
    one_frame = _traj(np.zeros((1, 2, 3)), np.ones((1, 2, 3)))
    s = derive_relax_settings([a, one_frame])
    np.testing.assert_allclose(s.stop_rms, 0.5 * 0.1, rtol=1e-12)
    assert s.num_skipped == 1 and "capped" in s.clamps[0] and "not used" in s.describe()
    # frozen last frame: floor
    frozen = _stepped([0.1, 0.0], [1.0, 1.0, 0.01], seed=2)
    assert derive_relax_settings([frozen]).stop_rms == 1e-5
    # final forces above half the first-frame largest force: stop_fmax capped there
    stuck = _stepped([0.1, 0.1], [1.0, 1.0, 0.9], seed=3)
    np.testing.assert_allclose(derive_relax_settings([stuck]).stop_fmax, 0.5, rtol=1e-12)


def test_derived_settings_refuse_bad_input():
    with pytest.raises(ValueError, match="no trajectories"):
        derive_relax_settings([])
    with pytest.raises(ValueError, match="two or more frames with forces .*1 frame"):
        derive_relax_settings([_traj(np.zeros((1, 2, 3)), np.ones((1, 2, 3)))])
    no_forces = _stepped([0.1], [1.0, 0.5]).replace(forces=None)
    with pytest.raises(ValueError, match="no forces"):
        derive_relax_settings([no_forces])
    zero = _traj(np.random.default_rng(0).normal(size=(3, 2, 3)), np.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="is zero before its last frame"):
        derive_relax_settings([zero])
    uphill = _stepped([-0.1, -0.2], [1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="do not move along the recorded forces"):
        derive_relax_settings([uphill])
    with pytest.raises(ValueError, match="positive finite"):
        step_grid(0.0)


# ----------------------------------------------------------------------------- near-equilibrium acceptance

MORSE = potentials.init_morse_params(depth=0.5, r0=2.35, alpha=1.5)
REF_STEP = 0.12  # Å²/eV, the reference optimiser's step
OLD_GRID = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08)


def _near_equilibrium_runs(num=3, start_fmax=0.015, end_fmax=0.003):
    """Reference relaxations of 8-atom Morse clusters that start near their minimum, displaced along
    their softest vibrational modes (largest force ``start_fmax`` eV/Å, as DFT defect runs start), and
    descend with the fixed step ``REF_STEP`` until the largest force is below ``end_fmax``; every
    frame's positions and forces are recorded."""
    rng = np.random.default_rng(7)
    forces_of = jax.jit(potentials.morse_force_fn)
    minimum = jax.jit(lambda s: relax.rollout(potentials.morse_force_fn, relax.FixedStep(0.05),
                                              {"model": MORSE, "step_rule": {}}, s, NO_MODIFIERS,
                                              relax.RolloutConfig(max_frames=3000, stop_rms=1e-7)).positions)
    hessian = jax.jit(jax.hessian(lambda x, mask: potentials.morse_energy(MORSE, x[None], mask[None])[0]))
    cube = np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(2)], float) * 2.4
    trajs = []
    for i in range(num):
        s = bm.from_arrays([["Si"] * 8], [cube + rng.normal(0, 0.2, cube.shape)])
        s = s.replace(positions=minimum(s))
        modes = np.linalg.eigh(np.asarray(hessian(s.positions[0], s.mask[0])).reshape(24, 24))[1]
        push = (modes[:, 6:9] @ rng.normal(size=3)).reshape(1, 8, 3)  # skip the 6 rigid motions
        fmax_of = lambda x: float(fire.max_force(forces_of(MORSE, s.replace(positions=x)), s.mask)[0])  # noqa: E731
        x = s.positions + 0.01 * push * start_fmax / fmax_of(s.positions + 0.01 * push)
        frames, forces = [x], [forces_of(MORSE, s.replace(positions=x))]
        while fmax_of(frames[-1]) >= end_fmax and len(frames) < 500:
            frames.append(frames[-1] + REF_STEP * forces[-1])
            forces.append(forces_of(MORSE, s.replace(positions=frames[-1])))
        trajs.append(_traj(np.concatenate(frames), np.concatenate(forces), tid=f"near{i}"))
    return trajs


def test_derived_settings_move_near_equilibrium_rollouts_that_the_defaults_leave_still():
    trajs = _near_equilibrium_runs()
    assert all(0.01 < t.max_force()[0] < 0.05 and t.num_frames > 5 for t in trajs)
    settings = derive_relax_settings(trajs)
    np.testing.assert_allclose(settings.lsq_step, REF_STEP, rtol=1e-3)
    batch = make_relaxation_batch([t.species for t in trajs], [t.initial_positions for t in trajs],
                                     [t.final_positions for t in trajs], [None] * 3, batch_size=4, max_atoms=8)
    start_dq = float(jnp.mean(losses.delta_q(batch.initial.positions, batch.target_positions,
                                             batch.initial.masses, batch.initial.mask)[:3]))
    real = np.arange(4) < 3

    def best(grid, cfg):
        res = bm.make_grid_search(potentials.morse_force_fn, cfg)(MORSE, batch, jnp.asarray(grid))
        i = int(jnp.argmin(res.mean_dq))
        return float(res.mean_dq[i]), np.asarray(res.num_frames)[:, real], i

    # library defaults: every rollout stops after its first frame at every grid step, and hardly moves
    dq_old, frames_old, _ = best(OLD_GRID, relax.RolloutConfig(max_frames=75, stop_rms=1e-3))
    assert np.all(frames_old == 1), frames_old
    assert dq_old > 0.85 * start_dq
    # derived settings: the best grid step is inside the grid, every rollout moves and gets close
    derived = relax.RolloutConfig(max_frames=75, stop_rms=settings.stop_rms, stop_fmax=settings.stop_fmax)
    dq_new, frames_new, i = best(settings.grid_steps, derived)
    assert 0 < i < len(settings.grid_steps) - 1
    assert np.all(frames_new[i] > 1), frames_new[i]
    assert dq_new < 0.2 * start_dq, (dq_new, start_dq)
    # FIRE: ASE's fmax 0.05 eV/Å is converged before the first step; the derived fmax takes steps
    s = batch.initial
    ase_default = fire.make_fire_runner(potentials.morse_force_fn, fire.FireConfig())(MORSE, s)
    assert np.all(np.asarray(ase_default.state.num_frames)[real] == 0)
    derived_fire = fire.make_fire_runner(potentials.morse_force_fn, fire.FireConfig(fmax=settings.fire_fmax))(MORSE, s)
    assert np.all(np.asarray(derived_fire.state.num_frames)[real] > 0)
