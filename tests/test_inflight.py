"""In-flight batching of the relax API: stopped rows refilled with waiting structures, each structure
relaxed exactly as alone (frame map and FIRE, a pair potential and a tiny ADAPT)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from bptt_mlip.models import adapt, potentials
from bptt_mlip.relax import fire
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig
from bptt_mlip.relax.step_rules import FixedStep
from bptt_mlip.workflow import api, buckets, inflight

BUCKETS = (8, 16)
MORSE = potentials.init_morse_params()


def _clusters(n: int = 11, seed: int = 0, largest: int = 14) -> list[Atoms]:
    """Non-periodic Si clusters of 3 to ``largest`` atoms (14: two buckets), rattled by different amounts."""
    rng = np.random.default_rng(seed)
    crystal = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 1, 1)
    out = []
    for i in range(n):
        size = int(rng.integers(3, largest + 1))
        atoms = Atoms("Si" * size, positions=crystal.positions[:size])
        atoms.rattle(0.02 + 0.04 * (i % 4), seed=i)
        out.append(atoms)
    return out


def _alone(objs, model, **kwargs):
    """Each structure relaxed on its own with the fixed-batch path."""
    return [api.relax_structures(o, model, in_flight=False, **kwargs) for o in objs]


def _assert_same_as_alone(out, alone, atol=1e-5):
    for i, ref in enumerate(alone):
        assert out.num_frames[i] == ref.num_frames[0], i
        assert out.converged[i] == ref.converged[0] and out.diverged[i] == ref.diverged[0], i
        np.testing.assert_allclose(out.structures[i].positions, ref.structure.positions, atol=atol, err_msg=str(i))
        np.testing.assert_allclose(out.max_force[i], ref.max_force[0], rtol=1e-4, atol=1e-5, err_msg=str(i))


@pytest.fixture(scope="module")
def tiny_adapt():
    params = {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(0)), "step_rule": {"eta": np.float32(0.02)}}
    # annealing and momentum make each frame depend on the structure's own frame index and history
    modifiers = FrameModifiers(momentum=0.1, anneal=0.8, max_displacement=0.1)
    return api.TrainedModel(adapt.TINY, adapt.Normalizer.identity(), params, FixedStep(0.02), modifiers)


@pytest.mark.parametrize("stop_fmax", [0.0, 0.3])
def test_frame_in_flight_equals_each_alone_pair_potential(stop_fmax):
    objs = _clusters()
    kw = dict(params=MORSE, step_size=0.1, max_frames=60, stop_rms=2e-3, stop_fmax=stop_fmax, buckets=BUCKETS)
    out = api.relax_structures(objs, potentials.morse_force_fn, batch_size=2, in_flight=True, **kw)
    alone = _alone(objs, potentials.morse_force_fn, **kw)
    _assert_same_as_alone(out, alone)
    assert len(set(out.num_frames.tolist())) > 3 and out.converged.any()  # stops at many different frames
    fixed = api.relax_structures(objs, potentials.morse_force_fn, batch_size=2, in_flight=False, **kw)
    # refilled rows: fewer structure-frames computed than fixed batches that wait for their slowest member
    assert out.work["slot_frames"] < fixed.work["slot_frames"]
    assert out.work["frames_needed"] == fixed.work["frames_needed"] == int(np.sum(out.num_frames + 1))
    assert out.work["slot_frames"] >= out.work["frames_needed"]


def test_frame_in_flight_equals_each_alone_adapt(tiny_adapt):
    objs = _clusters(7, seed=1, largest=8)  # one bucket: a cheap test of the model's own step rule
    kw = dict(max_frames=20, stop_rms=2e-3, buckets=BUCKETS)
    out = api.relax_structures(objs, tiny_adapt, batch_size=2, **kw)  # in flight by default
    assert out.work["batch_calls"] > 2
    _assert_same_as_alone(out, _alone(objs, tiny_adapt, **kw), atol=2e-5)
    assert len(set(out.num_frames.tolist())) > 1


def test_fire_in_flight_equals_each_alone():
    objs = _clusters()
    cfg = fire.FireConfig(fmax=0.02, max_steps=80)
    kw = dict(params=MORSE, method="fire", fire_config=cfg, buckets=BUCKETS)
    out = api.relax_structures(objs, potentials.morse_force_fn, batch_size=4, **kw)
    _assert_same_as_alone(out, _alone(objs, potentials.morse_force_fn, **kw))
    assert out.converged.sum() > 3 and len(set(out.num_frames.tolist())) > 3
    fixed = api.relax_structures(objs, potentials.morse_force_fn, batch_size=4, in_flight=False, **kw)
    assert out.work["slot_frames"] < fixed.work["slot_frames"]
    assert out.work["batch_frames"] < fixed.work["batch_frames"]


def test_tiny_adapt_fire_in_flight_equals_alone(tiny_adapt):
    objs = _clusters(5, seed=2, largest=8)
    kw = dict(method="fire", fire_config=fire.FireConfig(fmax=0.5, max_steps=10), buckets=BUCKETS)
    out = api.relax_structures(objs, tiny_adapt, batch_size=2, **kw)
    _assert_same_as_alone(out, _alone(objs, tiny_adapt, **kw), atol=2e-5)


def _frame_engine(max_frames: int, stop_rms: float = 2e-3) -> inflight.FrameEngine:
    cfg = RolloutConfig(max_frames=max_frames)
    return inflight.FrameEngine(potentials.morse_force_fn, FixedStep(), FrameModifiers(), cfg,
                                {"model": MORSE, "step_rule": {"eta": jnp.float32(0.1)}}, stop_rms)


def test_per_structure_frame_limits_honoured_per_row():
    objs = _clusters(8, seed=3, largest=8)
    limits = [1, 5, 0, 40, 3, 60, 7, 2]
    work: dict = {}
    out = buckets.relax_in_flight(objs, _frame_engine(60), 2, BUCKETS, 5.0, limits=limits, work=work)
    for i, (obj, limit) in enumerate(zip(objs, limits)):
        ref = api.relax_structures(obj, potentials.morse_force_fn, params=MORSE, step_size=0.1,
                                   max_frames=max(limit, 1), stop_rms=2e-3, buckets=BUCKETS, in_flight=False)
        if limit == 0:  # never moved: its start is its end
            assert out["num_frames"][i] == 0 and not out["converged"][i]
            np.testing.assert_array_equal(out["structures"][i].positions, obj.positions.astype(np.float32))
            continue
        assert out["num_frames"][i] == ref.num_frames[0] <= limit, i
        assert out["converged"][i] == ref.converged[0]
        np.testing.assert_allclose(out["structures"][i].positions, ref.structure.positions, atol=1e-5)
    assert out["num_frames"][5] > 7  # the long limit is not cut at another structure's limit
    # when the host takes rows out (short calls, both rows freed first) changes nothing
    other = buckets.relax_in_flight(objs, _frame_engine(60), 2, BUCKETS, 5.0, limits=limits, max_iterations=3,
                                    refill_rows=2)
    np.testing.assert_array_equal(other["num_frames"], out["num_frames"])
    for a, b in zip(other["structures"], out["structures"]):
        np.testing.assert_array_equal(a.positions, b.positions)
    with pytest.raises(ValueError, match="limits"):
        buckets.relax_in_flight(objs, _frame_engine(60), 2, BUCKETS, 5.0, limits=[3, 4])


class _CountingEngine:
    """Wraps an engine and records, per compiled call, which rows were occupied (a host-loop counter)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, structures, slots, max_iterations, min_free):
        self.calls.append((np.asarray(structures.species).copy(), slots.occupied.copy()))
        return self.engine.run(structures, slots, max_iterations, min_free)


def test_diverged_rows_are_freed_and_padding_does_not_leak():
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    good = [Atoms("Si" * 6, positions=crystal.positions[:6] + 0.03 * k) for k in range(3)]
    for k, atoms in enumerate(good):
        atoms.rattle(0.05, seed=10 + k)
    # two atoms 0.3 Å apart: the Morse force throws them apart in the first frame (a diverged relaxation)
    bad = Atoms("Si" * 4, positions=[[0, 0, 0], [0.3, 0, 0], [2.3, 0, 0], [0, 2.3, 0]])
    objs = [good[0], bad, good[1], good[2]]
    engine = _CountingEngine(_frame_engine(50))
    out = buckets.relax_in_flight(objs, engine, 2, BUCKETS, 5.0)
    assert out["diverged"][1] and not out["converged"][1] and out["num_frames"][1] == 0
    alone = _alone(objs, potentials.morse_force_fn, params=MORSE, step_size=0.1, max_frames=50, stop_rms=2e-3,
                   buckets=BUCKETS)
    for i in (0, 2, 3):
        assert out["num_frames"][i] == alone[i].num_frames[0]
        np.testing.assert_allclose(out["structures"][i].positions, alone[i].structure.positions, atol=1e-5)
    assert alone[1].diverged[0] and alone[1].num_frames[0] == 0
    # the diverged structure's row was handed to the next structure after one call
    species, occupied = engine.calls[1]
    assert occupied.all() and (species[:, 0] == 14).all() and engine.calls[0][1].sum() == 2
    # rows left empty once the queue is done hold no atoms (no stale structure computed in them)
    last_species, last_occupied = engine.calls[-1]
    assert np.all(last_species[~last_occupied] == 0)


def test_fire_non_finite_structure_is_freed_and_neighbours_unchanged():
    objs = _clusters(5, seed=4)

    def force_fn(params, structures):  # NaN forces for every structure of exactly 5 atoms
        forces = potentials.morse_force_fn(params, structures)
        poison = (structures.num_atoms() == 5)[:, None, None]
        return jnp.where(poison, jnp.nan, forces)

    objs[2] = Atoms("Si" * 5, positions=bulk("Si", "diamond", a=5.43, cubic=True).positions[:5])
    sizes = [len(o) for o in objs]
    assert sizes.count(5) == 1
    cfg = fire.FireConfig(fmax=0.02, max_steps=60)
    kw = dict(params=MORSE, method="fire", fire_config=cfg, buckets=BUCKETS)
    out = api.relax_structures(objs, force_fn, batch_size=2, **kw)
    alone = _alone(objs, force_fn, **kw)
    # stopped at its first non-finite step, not stepped on to max_steps as the fixed path does
    assert out.diverged[2] and not out.converged[2] and out.num_frames[2] == 1
    assert alone[2].diverged[0] and alone[2].num_frames[0] == 60
    _assert_same_as_alone(api.RelaxOutput(**{k: (np.delete(v, 2) if isinstance(v, np.ndarray) else v)
                                             for k, v in _fields(out).items()}), alone[:2] + alone[3:])


def _fields(out: api.RelaxOutput) -> dict:
    d = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    d["structures"] = [s for i, s in enumerate(out.structures) if i != 2]
    return d


def _count_compiles(fn):
    """(fn(), XLA backend compilations while it ran)."""
    count = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        return fn(), count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_compiled_shapes_bounded_and_trajectories_keep_fixed_batches():
    objs = _clusters(13, seed=5)
    kw = dict(params=MORSE, step_size=0.1, max_frames=20, buckets=BUCKETS, batch_size=4)
    first = api.relax_structures(objs, potentials.morse_force_fn, **kw)
    assert first.work["compiled_shapes"] <= 2 * len(BUCKETS)
    # a second call, other structures and counts per bucket but the same row counts: nothing compiles
    more = _clusters(17, seed=6)
    assert all(min(len([o for o in x if (len(o) <= 8) == small]) for small in (True, False)) >= 4 for x in (objs, more))
    again, compiled = _count_compiles(lambda: api.relax_structures(more, potentials.morse_force_fn, **kw))
    assert compiled == [] and again.work["compiled_shapes"] == first.work["compiled_shapes"]
    reordered = api.relax_structures(objs[::-1], potentials.morse_force_fn, **kw)
    np.testing.assert_array_equal(reordered.num_frames, first.num_frames[::-1])
    traj = api.relax_structures(objs[:2], potentials.morse_force_fn, return_trajectory=True, **kw)
    assert traj.trajectories[0].shape == (traj.num_frames[0] + 1, len(objs[0]), 3)
    with pytest.raises(ValueError, match="in_flight=False"):
        api.relax_structures(objs[:2], potentials.morse_force_fn, return_trajectory=True, in_flight=True, **kw)


def test_fire_stops_at_the_fmax_the_model_was_trained_with(tiny_adapt):
    from bptt_mlip.workflow import model_io

    objs = _clusters(4, seed=3)
    default = fire.FireConfig()
    assert model_io.fire_settings({}) == default  # nothing saved: ASE's
    saved = {"relax_settings": {"fire_fmax": 0.3}}
    assert model_io.fire_settings(saved) == dataclasses.replace(default, fmax=0.3)
    assert model_io.fire_settings(saved, fmax=0.1, max_steps=9) == dataclasses.replace(default, fmax=0.1, max_steps=9)
    # saved above every starting force: the model's fmax stops every structure before its first step
    model = dataclasses.replace(tiny_adapt, meta={"relax_settings": {"fire_fmax": 1e3}})
    kw = dict(method="fire", buckets=BUCKETS, batch_size=2, on_out_of_domain="ignore")
    by_default = api.relax_structures(objs, model, **kw)
    assert np.all(by_default.converged) and np.all(by_default.num_frames == 0)
    ase_fmax = api.relax_structures(objs, model, fire_config=dataclasses.replace(default, max_steps=5), **kw)
    assert np.all(ase_fmax.num_frames == 5) and not np.any(ase_fmax.converged)
