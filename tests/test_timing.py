"""The relax benchmark's force-call timing (experiments.timing) on a tiny model: both paths compute the same
forces, the rates are the atoms each call evaluates over its median time, and the published-size model is the
paper's ADAPT size."""

from __future__ import annotations

import jax
import numpy as np
from ase.build import bulk

from bptt_mlip import structures
from bptt_mlip.models import adapt
from bptt_mlip.relax.step_rules import FixedStep
from bptt_mlip.workflow import api, calculator
from experiments import timing


def _tiny_model():
    params = {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(0)), "step_rule": {"eta": np.float32(0.02)}}
    return api.TrainedModel(adapt.TINY, adapt.Normalizer.identity(), params, FixedStep(0.02))


def test_force_call_row_rates_and_published_size():
    model = _tiny_model()
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms
    atoms.rattle(0.05, seed=1)
    row = timing.force_call_row("tiny", model, atoms, batch_size=4, repeats=3, buckets={"buckets": (16,)})
    assert row["atoms"] == 8 and row["bucket_atoms"] == 16 and row["params"] == model.num_params()
    assert np.isclose(row["batched_atoms_per_s"], 4 * 8 / row["batched_call_s"])
    assert np.isclose(row["calculator_atoms_per_s"], 8 / row["calculator_call_s"])
    assert np.isclose(row["batched_over_calculator"], row["batched_atoms_per_s"] / row["calculator_atoms_per_s"])
    published = timing.published_size(model)
    c = published.config
    assert (c.d_model, c.d_ff, c.num_heads, c.num_layers) == (256, 512, 8, 8)
    assert c.input_encoding == model.config.input_encoding and published.normalizer is model.normalizer
    assert published.num_params() > 100 * model.num_params()
    # the calculator path computes what the batched force function does on the same structure
    work = atoms.copy()
    work.calc = calculator.BPTTCalculator(published, on_out_of_domain="ignore", buckets=(16,))
    batch = structures.from_arrays([atoms.get_chemical_symbols()], [atoms.positions], [np.asarray(atoms.cell)],
                                   max_atoms=16)
    batched = np.asarray(published.force_fn(published.model_params, batch))[0, :8]
    np.testing.assert_allclose(work.get_forces(), batched, rtol=1e-4, atol=1e-5)
