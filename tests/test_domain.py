"""A model's training domain, runaway end points, zero-spread standardisation, and the CLI's exit statuses."""

from __future__ import annotations

import json
import warnings

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from bptt_mlip import descriptors
from bptt_mlip import structures as structures_lib
from bptt_mlip.data.domain import Domain, OutOfDomainError, OutOfDomainWarning
from bptt_mlip.data.trajectory import Trajectory, make_trajectory
from bptt_mlip.models import adapt, periodic
from bptt_mlip.relax import fire
from bptt_mlip.relax.runaway import end_point_runaways
from bptt_mlip.relax.step_rules import FixedStep, LearnableStep, step_rule_to_dict
from bptt_mlip.relax.scan import FrameModifiers, RolloutConfig
from bptt_mlip.training import evaluate
from bptt_mlip.workflow import api, model_io
from bptt_mlip.workflow.calculator import BPTTCalculator
from bptt_mlip.workflow.cli import EXIT_DIVERGED, EXIT_OK, EXIT_UNCONVERGED, exit_status
from bptt_mlip.workflow.cli import main as cli_main

A_SI = 5.43  # Å, diamond Si
SI_FORCES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])  # per-atom force norms, eV/Å


def _si_trajectory(traj_id: str = "si8") -> Trajectory:
    """A two-frame relaxation of the 8-atom Si cell whose atom i feels a force of SI_FORCES[i] eV/Å along x."""
    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    start = si.positions + np.random.default_rng(0).normal(0.0, 0.02, si.positions.shape)
    forces = np.zeros((2, 8, 3))
    forces[:, :, 0] = SI_FORCES
    return make_trajectory(si.numbers, np.stack([start, si.positions]), cell=si.cell.array, pbc=True,
                           forces=forces, traj_id=traj_id)


@pytest.fixture(scope="module")
def si_domain() -> Domain:
    return Domain.from_trajectories([_si_trajectory()])


@pytest.fixture(scope="module")
def tiny_with_domain(si_domain) -> api.TrainedModel:
    params = {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(0)), "step_rule": {"eta": np.float32(0.02)}}
    return api.TrainedModel(adapt.TINY, adapt.Normalizer.identity(), params, LearnableStep(init_step=0.05),
                            meta={"domain": si_domain.to_dict()})


# --------------------------------------------------------------------------- the domain


def test_domain_from_trajectories_hand_computed(si_domain):
    d = si_domain
    assert d.species == (14,) and d.symbols == ("Si",) and d.num_atoms == (8, 8) and d.periodic == (True,)
    assert d.cell_length == pytest.approx((A_SI, A_SI))
    assert d.volume_per_atom == pytest.approx((A_SI**3 / 8, A_SI**3 / 8))
    # the closest pair: the Si-Si bond a sqrt(3) / 4 of the relaxed frame, or a shorter one of the rattled start
    bond = A_SI * np.sqrt(3) / 4
    assert 0.9 * bond < d.min_pair_distance <= bond + 1e-9
    # 99th percentile of the 16 per-atom norms (each of SI_FORCES twice), numpy's linear interpolation by hand
    sorted_norms = np.sort(np.repeat(SI_FORCES, 2))
    rank = 0.99 * (16 - 1)
    expected = sorted_norms[14] + (rank - 14) * (sorted_norms[15] - sorted_norms[14])
    assert d.force_scale == pytest.approx(expected) and d.force_scale == pytest.approx(3.5)
    assert d.num_trajectories == 1 and "Si" in d.describe()


def test_domain_json_roundtrip_and_checks(si_domain):
    d = si_domain
    again = Domain.from_dict(json.loads(json.dumps(d.to_dict())))
    assert again == d
    assert Domain.from_dict({**d.to_dict(), "a_key_of_a_later_version": 1}) == d
    with pytest.raises(ValueError, match="species"):
        Domain.from_dict({"num_atoms": [8, 8]})

    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    assert d.check(si) == [] and d.check_each([si, si]) == [[], []]
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)  # 8 atoms, a denser cell
    [cu_problems] = d.check_each([cu])
    assert any("Cu never seen in training (trained on Si)" in p for p in cu_problems)
    assert any("volume per atom" in p for p in cu_problems)
    big = si * (2, 2, 2)
    assert any("64 atoms, above the 8 seen" in p for p in d.check_each(big)[0])
    squeezed = bulk("Si", "diamond", a=4.5, cubic=True)  # volume per atom 0.57 x the trained one
    assert any("more than 25% outside" in p and "volume per atom" in p for p in d.check_each(squeezed)[0])
    strained = bulk("Si", "diamond", a=A_SI * 1.05, cubic=True)  # 16% more volume: inside the margin
    assert d.check(strained) == []
    water = molecule("H2O")
    water_problems = d.check_each(water)[0]
    assert any("H, O never seen" in p for p in water_problems) and any("no periodic cell" in p for p in water_problems)
    crushed = si.copy()
    crushed.positions[1] = crushed.positions[0] + [0.3, 0.0, 0.0]
    assert any("two atoms 0.3 Å apart" in p for p in d.check_each(crushed)[0])
    # the prefixed form names the structure; a Trajectory record is checked by its first frame
    assert d.check([si, cu])[0].startswith("structure 1 (Cu8): ")
    assert d.check(_si_trajectory()) == []


def test_save_load_with_domain_and_old_checkpoints_without(tmp_path, si_domain, tiny_with_domain):
    m = tiny_with_domain
    meta = step_rule_to_dict(m.step_rule, m.modifiers)
    model_io.save_model(tmp_path / "with", m.params, m.normalizer, m.config, meta, {"role": "t"}, domain=si_domain)
    loaded = api.TrainedModel.load(tmp_path / "with")
    assert loaded.domain == si_domain and loaded.meta["domain"]["species"] == [14]
    assert model_io.load_model(tmp_path / "with")[3]["domain"]["num_atoms"] == [8, 8]
    model_io.save_model(tmp_path / "as_dict", m.params, m.normalizer, m.config, meta, domain=si_domain.to_dict())
    assert api.TrainedModel.load(tmp_path / "as_dict").domain == si_domain
    # a checkpoint written before models carried a domain
    model_io.save_model(tmp_path / "old", m.params, m.normalizer, m.config, meta, {"role": "t"})
    old = api.TrainedModel.load(tmp_path / "old")
    assert old.domain is None and "domain" not in old.meta
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)  # nothing to check against: no warning
        api.relax_structures(bulk("Cu", "fcc", a=3.6, cubic=True), old, max_frames=1)


def test_unseen_element_warns_or_is_refused(tiny_with_domain):
    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    si.rattle(0.02, seed=3)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)
        inside = api.relax_structures(si, tiny_with_domain, max_frames=2)  # inside: no warning
    assert inside.domain_problems == [[]]
    with pytest.warns(OutOfDomainWarning, match="Cu never seen in training") as record:
        out = api.relax_structures([si, cu], tiny_with_domain, max_frames=2)
    assert len(record) == 1 and "structure 1 (Cu8)" in str(record[0].message)
    assert out.domain_problems[0] == [] and any("Cu" in p for p in out.domain_problems[1])
    assert np.all(out.num_frames == 2)  # warned, then relaxed
    with pytest.raises(OutOfDomainError, match="Cu never seen"):
        api.relax_structures([si, cu], tiny_with_domain, max_frames=2, on_out_of_domain="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)
        ignored = api.relax_structures([si, cu], tiny_with_domain, max_frames=2, on_out_of_domain="ignore")
    assert ignored.domain_problems == [[], []]
    with pytest.raises(ValueError, match="on_out_of_domain"):
        api.relax_structures(si, tiny_with_domain, on_out_of_domain="maybe")


def test_calculator_warns_once_per_new_structure(tiny_with_domain):
    calc = BPTTCalculator(tiny_with_domain)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
    cu.calc = calc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cu.get_forces()
        cu.positions[0] += 0.05  # an optimiser step: the same structure, no new warning
        cu.get_forces()
        si = bulk("Si", "diamond", a=A_SI, cubic=True)
        si.calc = calc
        si.get_forces()  # inside the domain
        na = bulk("Na", "bcc", a=4.2, cubic=True)
        na.calc = calc
        na.get_forces()  # a new structure outside
    domain_warnings = [w for w in caught if issubclass(w.category, OutOfDomainWarning)]
    assert len(domain_warnings) == 2
    assert "Cu never seen" in str(domain_warnings[0].message) and "Na never seen" in str(domain_warnings[1].message)
    strict = BPTTCalculator(tiny_with_domain, on_out_of_domain="error")
    cu.calc = strict
    with pytest.raises(OutOfDomainError, match="Cu"):
        cu.get_forces()


# --------------------------------------------------------------------------- runaways


def test_end_point_runaways_by_hand():
    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    start = si.positions
    cell = si.cell.array
    z = si.numbers
    ok, reasons = end_point_runaways(start, start + 0.05, z, cell)  # one structure, [N, 3]
    assert ok.shape == (1,) and not ok[0] and reasons == [""]

    close = start.copy()
    close[1] = close[0] + [0.1, 0.0, 0.0]  # two Si 0.1 Å apart (contact: 0.5 x 2 x 1.11 = 1.11 Å)
    far = start.copy()
    far[3] += [6.0, 0.0, 0.0]  # one atom 6 Å from its start (> 5 Å)
    nan = start.copy()
    nan[2, 1] = np.nan
    starts = np.stack([start] * 4)
    flags, reasons = end_point_runaways(starts, np.stack([start, close, far, nan]), np.stack([z] * 4),
                                        np.stack([cell] * 4), np.ones((4, 8), bool))
    assert flags.tolist() == [False, True, True, True]
    assert "atoms 0 (Si) and 1 (Si) ended 0.1 Å apart" in reasons[1] and "1.11 Å" in reasons[1]
    assert "atom 3 (Si) moved 6 Å" in reasons[2] and "non-finite" in reasons[3]
    assert not end_point_runaways(start, far, z, cell, max_total_displacement=7.0)[0][0]

    # minimum image: 0.1 Å apart across the face of a periodic cell, 9.9 Å apart without one
    pair = np.array([[0.05, 5.0, 5.0], [9.95, 5.0, 5.0]])
    assert end_point_runaways(pair, pair, [14, 14], np.eye(3) * 10.0)[0][0]
    assert not end_point_runaways(pair, pair, [14, 14], np.zeros((3, 3)))[0][0]
    assert not end_point_runaways(pair, pair, [14, 14], None)[0][0]
    # padded atoms (mask False) change nothing, even on top of a real one
    padded_end = np.concatenate([start, start[:1]])
    padded_z = np.concatenate([z, [0]])
    assert not end_point_runaways(padded_end[None], padded_end[None], padded_z[None], cell[None],
                                  (padded_z > 0)[None])[0][0]
    with pytest.raises(ValueError, match="expected initial and final positions"):
        end_point_runaways(start, start[:4], z, cell)


def test_short_pair_distances_fast_path_equals_ase():
    from bptt_mlip.data.geometry import pair_distances, short_pair_distances

    rng = np.random.default_rng(4)
    cell = np.array([[6.0, 0.0, 0.0], [2.5, 5.5, 0.0], [1.0, 1.5, 6.5]])  # triclinic, widths > 5 Å
    x = rng.uniform(0.0, 1.0, (12, 3)) @ cell
    exact = pair_distances(x, cell, pbc=True)
    fast = short_pair_distances(x, cell, reach=2.2)
    near = exact < 2.2
    np.testing.assert_allclose(fast[near], exact[near], rtol=1e-12)
    assert np.all(fast[~near] >= 2.2 - 1e-12)  # beyond the reach never reported shorter
    narrow = np.eye(3) * 2.0  # narrower than twice the reach: ASE's exact search
    y = x[:3] / 3
    np.testing.assert_allclose(short_pair_distances(y, narrow, reach=2.2), pair_distances(y, narrow, True))


def test_shipped_relaxations_are_not_runaways():
    """The reference relaxations that the defaults were chosen from (module docstring of relax.runaway)."""
    from bptt_mlip.data import datasets

    for spec, most_moved in (("default:si_defects", 2.95), ("default:crystals", 0.67)):
        trajs = datasets.load_dataset_spec(spec, report=lambda line: None, min_atom_distance=0).trajectories
        flags = [end_point_runaways(t.initial_positions, t.final_positions, t.species, t.cell)[0][0] for t in trajs]
        moved = max(np.linalg.norm(t.final_positions - t.initial_positions, axis=-1).max() for t in trajs)
        assert not any(flags) and most_moved - 0.01 < moved < most_moved  # 2.94 and 0.66 Å: 5 Å is 1.7 x the most


def _pull_together(k, structures):
    """A ``force_fn(k, structures)``: every real atom pulled towards every other by k |x_j - x_i| (eV/Å);
    the only rest point is every atom on top of each other."""
    x, m = structures.positions, structures.mask
    d = (x[:, None, :, :] - x[:, :, None, :]) * m[:, None, :, None]  # [B, i, j, 3] = x_j - x_i
    return jnp.where(m[..., None], k * jnp.sum(d, axis=2), 0.0)


def _push_first_atom(_, structures):
    """A ``force_fn``: 1 eV/Å along -x on the first atom of each structure, nothing else."""
    f = jnp.zeros_like(structures.positions)
    return f.at[:, 0, 0].set(-1.0)


def test_relaxations_that_collapse_or_fly_away_are_diverged():
    dimer = Atoms("Si2", positions=[[0.0, 0.0, 0.0], [2.3, 0.0, 0.0]])
    # the frame map: the pair distance shrinks by 1 - 2 eta k = 0.6 per frame until the RMS movement
    # stops the rollout ("converged", as it was reported before) with the atoms ~1e-3 Å apart
    out = api.relax_structures(dimer, _pull_together, params=1.0, step_size=0.2, max_frames=60, stop_rms=1e-3)
    end = out.structure.positions
    assert np.linalg.norm(end[1] - end[0]) < 0.1
    assert out.diverged.tolist() == [True] and out.converged.tolist() == [False]
    # FIRE "converges" once |F| = k d < fmax, i.e. with the atoms < 0.05 Å apart
    out = api.relax_structures(dimer, _pull_together, params=1.0, method="fire",
                               fire_config=fire.FireConfig(fmax=0.05, max_steps=300))
    assert np.linalg.norm(out.structure.positions[1] - out.structure.positions[0]) < 0.05
    assert out.diverged.tolist() == [True] and out.converged.tolist() == [False]
    # an atom pushed 0.5 Å per frame for 20 frames: no single frame is too large, the whole run is
    far = api.relax_structures(dimer, _push_first_atom, params=0.0, step_size=0.5, max_frames=20, stop_rms=1e-6)
    assert far.structure.positions[0, 0] == pytest.approx(-10.0, abs=1e-4) and far.diverged.tolist() == [True]
    allowed = api.relax_structures(dimer, _push_first_atom, params=0.0, step_size=0.5, max_frames=20, stop_rms=1e-6,
                                   max_total_displacement=11.0)
    assert allowed.diverged.tolist() == [False]


def test_evaluation_tables_count_runaways():
    start = np.array([[0.0, 0.0, 0.0], [2.3, 0.0, 0.0]])
    target = np.array([[0.0, 0.0, 0.0], [2.35, 0.0, 0.0]])
    moves = np.array([[0.0, 0.0, 0.0], [2.4, 0.2, 0.0]])
    trajs = [make_trajectory([14, 14], np.stack([start, target]), traj_id="collapses"),
             make_trajectory([14, 14], np.stack([start + [0, 0, 1.0], moves]), traj_id="also")]
    summary, per = evaluate.fire_table(_pull_together, 1.0, trajs, fire.FireConfig(fmax=0.05, max_steps=300),
                                       batch_size=2, buckets=(8,))
    assert per["runaway"].tolist() == [True, True] and per["diverged"].tolist() == [True, True]
    assert not per["converged"].any() and summary["num_diverged"] == 2
    rule = FixedStep(step_size=0.2)
    summary, per = evaluate.relaxation_table(_pull_together, rule, {"model": 1.0, "step_rule": rule.init()}, trajs,
                                             FrameModifiers(), RolloutConfig(max_frames=60, stop_rms=1e-3),
                                             batch_size=2, buckets=(8,))
    assert per["diverged"].tolist() == [True, True] and summary["num_diverged"] == 2
    # a model that does not move the atoms leaves a sound structure: nothing flagged
    still = lambda p, s: jnp.zeros_like(s.positions)  # noqa: E731
    _, per = evaluate.relaxation_table(still, rule, {"model": 1.0, "step_rule": rule.init()}, trajs,
                                       FrameModifiers(), RolloutConfig(max_frames=3), batch_size=2, buckets=(8,))
    assert not per["diverged"].any() and not per["runaway"].any()


# --------------------------------------------------------------------------- the CLI's exit statuses


def test_exit_status_rules():
    assert exit_status([True, True], [False, False]) == EXIT_OK
    assert exit_status([True, False], [False, False]) == EXIT_OK
    assert exit_status([True, False], [False, False], fail_on_unconverged=True) == EXIT_UNCONVERGED
    assert exit_status([True, False], [False, True], fail_on_unconverged=True) == EXIT_DIVERGED
    assert exit_status([False], [True]) == EXIT_DIVERGED
    assert (EXIT_OK, EXIT_DIVERGED, EXIT_UNCONVERGED) == (0, 1, 3)


def test_cli_exit_codes_and_domain(tmp_path, capsys, tiny_with_domain, si_domain):
    m = tiny_with_domain
    ckpt = tmp_path / "model"
    model_io.save_model(ckpt, m.params, m.normalizer, m.config, step_rule_to_dict(m.step_rule, m.modifiers),
                        domain=si_domain)
    si = bulk("Si", "diamond", a=A_SI, cubic=True)
    si.rattle(0.05, seed=5)
    ase.io.write(tmp_path / "si.cif", si)
    out = str(tmp_path / "out.extxyz")
    base = ["relax", str(tmp_path / "si.cif"), "-c", str(ckpt), "--out", out, "--max-frames", "1"]
    # one frame of a random model with a tight stop: not converged, not diverged
    assert cli_main(base + ["--stop-rms", "1e-9"]) == 0
    assert cli_main(base + ["--stop-rms", "1e-9", "--fail_on_unconverged"]) == 3
    assert cli_main(base + ["--stop-rms", "10", "--fail_on_unconverged"]) == 0  # converged after its frame
    assert ase.io.read(out).info["in_domain"] is True
    capsys.readouterr()

    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 1, 2)
    ase.io.write(tmp_path / "cu.cif", cu)
    cu_args = ["relax", str(tmp_path / "cu.cif"), "-c", str(ckpt), "--out", out, "--max-frames", "1",
               "--stop-rms", "1e-9"]
    assert cli_main(cu_args) == 0  # warned, relaxed
    err = capsys.readouterr().err
    assert "warning: outside the training domain" in err and "Cu never seen in training" in err
    assert ase.io.read(out).info["in_domain"] is False
    assert cli_main(cu_args + ["--out_of_domain=error"]) == 2
    assert "Cu never seen" in capsys.readouterr().err
    assert cli_main(cu_args + ["--out-of-domain", "ignore"]) == 0
    assert "Cu" not in capsys.readouterr().err

    # two atoms 0.1 Å apart that the model's one small frame cannot separate: a runaway end point, exit 1
    crushed = si.copy()
    crushed.positions[1] = crushed.positions[0] + [0.1, 0.0, 0.0]
    ase.io.write(tmp_path / "crushed.cif", crushed)
    assert cli_main(["relax", str(tmp_path / "crushed.cif"), "-c", str(ckpt), "--out", out, "--max-frames", "1",
                     "--stop-rms", "1e-9"]) == 1
    assert ase.io.read(out).info["diverged"] is True


# --------------------------------------------------------------------------- standardisation


def test_published_standardisation_unchanged_for_columns_with_spread():
    mean = np.linspace(-1.0, 4.0, 12).astype(np.float32)
    std = np.linspace(0.05, 3.0, 12).astype(np.float32)
    norm = adapt.Normalizer(jnp.asarray(mean), jnp.asarray(std), jnp.zeros(3), jnp.ones(3))
    v = np.linspace(2.0, -3.0, 12).astype(np.float32)
    got = np.asarray(norm.normalize_inputs(jnp.asarray(v)))
    by_hand = (v.astype(np.float64) - mean) / (0.3 * (std.astype(np.float64) + 1e-6))
    np.testing.assert_allclose(got, by_hand, rtol=2e-6)
    assert got[0] == pytest.approx((2.0 + 1.0) / (0.3 * (0.05 + 1e-6)), rel=2e-6)  # (v - mean) / (0.3 (std + 1e-6))
    # bit for bit the published float32 expression
    published = (jnp.asarray(v) - norm.input_mean) / (0.3 * (norm.input_std + 1e-6))
    np.testing.assert_array_equal(got, np.asarray(published))


def test_zero_spread_columns_never_divide_by_zero():
    norm = adapt.normalizer_from_trajectories([_si_trajectory()])  # one element: the 9 descriptor columns are constant
    std = np.asarray(norm.input_std)
    assert np.all(std[3:] == 0.0) and np.all(std[:3] > 0.5)
    names = list(descriptors.DESCRIPTOR_NAMES)
    si_f, cu_f = descriptors.element_features(np.array([14, 29]))
    cu_raw = jnp.concatenate([jnp.zeros(3), jnp.asarray(cu_f, jnp.float32)])
    si_raw = jnp.concatenate([jnp.zeros(3), jnp.asarray(si_f, jnp.float32)])
    cu_in, si_in = np.asarray(norm.normalize_inputs(cu_raw)), np.asarray(norm.normalize_inputs(si_raw))
    assert np.all(si_in[3:] == 0.0)  # the trained element: exactly the published 0
    valence, group = 3 + names.index("valence_electrons"), 3 + names.index("group")
    assert cu_in[valence] == pytest.approx((11 - 4) / (0.3 * 4), rel=1e-6)  # 5.83, not 2.3e7
    assert cu_in[group] == pytest.approx((11 - 14) / (0.3 * 14), rel=1e-6)
    assert np.all(np.abs(cu_in) < 50)
    # coordinates keep the published formula
    xyz = (0.0 - np.asarray(norm.input_mean)[:3]) / (0.3 * (std[:3].astype(np.float64) + 1e-6))
    np.testing.assert_allclose(cu_in[:3], xyz, rtol=2e-6)
    # a constant column whose value is 0: divided by 0.3 x 1
    zero_col = adapt.Normalizer(jnp.zeros(12), jnp.zeros(12), jnp.zeros(3), jnp.ones(3))
    assert float(zero_col.normalize_inputs(jnp.full(12, 0.6))[5]) == pytest.approx(2.0, rel=1e-6)
    # what the models apply: ADAPT's inputs and the periodic ADAPT's descriptor inputs
    s = structures_lib.from_atoms([bulk("Cu", "fcc", a=3.6)])
    inputs = np.asarray(adapt.model_inputs(s, norm, adapt.TINY))[0, 0]
    np.testing.assert_allclose(inputs[3:], cu_in[3:], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(periodic.descriptor_inputs(s, norm))[0, 0], cu_in[3:], rtol=1e-6)
