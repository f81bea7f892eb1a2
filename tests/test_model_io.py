"""Model files: save_model / load_model round trip, run-directory resolution, clear errors."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from bptt_mlip.data import batching, store
from bptt_mlip.models import adapt
from bptt_mlip.training import checkpoint, steps
from bptt_mlip.workflow import api, model_io

STEP_META = {"kind": "learnable", "init_step": 0.05, "momentum": 0.0, "anneal": 1.0, "noise_std": 0.0,
             "max_displacement": 0.0}


def _normalizer():
    return adapt.Normalizer(
        input_mean=np.linspace(-1.0, 1.0, 12).astype(np.float32),
        input_std=np.linspace(0.5, 2.0, 12).astype(np.float32),
        force_mean=np.array([0.1, -0.2, 0.0], np.float32), force_std=np.array([1.5, 0.7, 1.1], np.float32),
    )


def _params(seed=0):
    return {"model": adapt.init_params(adapt.TINY, jax.random.PRNGKey(seed)), "step_rule": {"eta": np.float32(0.04)}}


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_save_then_load_gives_back_the_same_model(tmp_path):
    params, norm = _params(), _normalizer()
    extra = {"role": "bptt_best_validation", "history": [{"loss": np.float32(0.5)}, {"loss": float("inf")}]}
    written = model_io.save_model(tmp_path / "m", params, norm, adapt.TINY, STEP_META, extra)
    assert written == tmp_path / "m" / "0" and written.is_dir()
    config, norm2, params2, meta = model_io.load_model(tmp_path / "m")
    assert config == adapt.TINY
    assert _leaves_equal(params2, params) and set(params2) == {"model", "step_rule"}
    for name in ("input_mean", "input_std", "force_mean", "force_std"):
        np.testing.assert_array_equal(np.asarray(getattr(norm2, name)), np.asarray(getattr(norm, name)))
    assert model_io.saved_step_rule(meta) == STEP_META
    assert meta["role"] == "bptt_best_validation" and meta["history"] == [{"loss": 0.5}, {"loss": "inf"}]
    # the rebuilt model predicts the same forces as the one saved
    batch = next(iter(batching.force_batches(store.load_default_dataset("si_defects")[:2], 4)))
    before = adapt.make_force_fn(adapt.TINY, norm)(params["model"], batch.structures)
    after = adapt.make_force_fn(config, norm2)(params2["model"], batch.structures)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_an_empty_step_group_and_no_step_rule_come_back_empty(tmp_path):
    params = {"model": _params()["model"], "step_rule": {}}
    model_io.save_model(tmp_path / "pre", params, _normalizer(), adapt.TINY, {}, {"role": "pretrained"})
    _, _, params2, meta = model_io.load_model(tmp_path / "pre")
    assert params2.get("step_rule", {}) == {} and _leaves_equal(params2["model"], params["model"])
    assert model_io.saved_step_rule(meta) == {}


def test_a_run_directory_resolves_to_its_best_model(tmp_path):
    run = tmp_path / "run"
    model_io.save_model(run / "checkpoints" / "pretrained", _params(1), _normalizer(), adapt.TINY, {}, {"role": "pre"})
    assert model_io.resolve_checkpoint_dir(run) == run / "checkpoints" / "pretrained"
    model_io.save_model(run / "checkpoints" / "bptt_best", _params(2), _normalizer(), adapt.TINY, STEP_META,
                        {"role": "best"})
    assert model_io.resolve_checkpoint_dir(run) == run / "checkpoints" / "bptt_best"
    _, _, params, meta = model_io.load_model(run)
    assert meta["role"] == "best" and _leaves_equal(params["model"], _params(2)["model"])
    assert api.resolve_checkpoint_dir is model_io.resolve_checkpoint_dir


def test_trained_model_load_uses_the_same_files(tmp_path):
    model_io.save_model(tmp_path / "m", _params(3), _normalizer(), adapt.TINY, STEP_META, {"role": "best"})
    loaded = api.TrainedModel.load(tmp_path / "m")
    config, _, params, _ = model_io.load_model(tmp_path / "m")
    assert loaded.config == config and _leaves_equal(loaded.model_params, params["model"])


def test_missing_empty_and_foreign_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        model_io.load_model(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # loading never creates the directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        model_io.load_model(tmp_path / "empty")
    state = steps.TrainState(step=np.int32(0), params=_params(), opt_state=optax.identity().init(_params()),
                             key=jax.random.PRNGKey(0))
    checkpoint.save_checkpoint(tmp_path / "foreign", 0, state, _normalizer(), {"role": "x"})
    with pytest.raises(ValueError, match="has no 'model_config'"):
        model_io.load_model(tmp_path / "foreign")
