"""The epoch loop and its pieces (bptt_mlip.training.loop), on a one-parameter model whose
updates can be followed by hand: metric sums, best parameters, early stopping, the typed stop
after non-finite updates, and checkpoint-then-resume equality."""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bptt_mlip.training import loop
from bptt_mlip.training import optim


@flax.struct.dataclass
class State:
    step: jnp.ndarray
    params: dict
    opt_state: object
    key: jax.Array


def sqrt_loss(params, x):
    """(sqrt(w) - x)^2: finite for w >= 0, NaN (loss and gradient) once an update makes w negative."""
    return jnp.mean((jnp.sqrt(params["w"]) - x) ** 2)


def make_update(tx, with_force_batch=False):
    @jax.jit
    def update(state, batch, force_batch=None):
        extra = 0.0 if force_batch is None else jnp.mean(force_batch)
        loss, grads = jax.value_and_grad(lambda p: sqrt_loss(p, batch) + 0.1 * extra * p["w"])(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        key, _ = jax.random.split(state.key)
        new = State(state.step + 1, optax.apply_updates(state.params, updates), opt_state, key)
        return new, {"loss": loss, **optim.nonfinite_counts(opt_state)}

    return update


def init(tx, w=1.0):
    params = {"w": jnp.asarray(w, jnp.float32)}
    return State(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))


def quiet(_message):
    return None


NAMES = loop.PhaseNames("bptt", step_log="bptt_step", bar="test epoch")


# ----------------------------------------------------------------------------- pieces


def test_epoch_metrics_sum_and_mean_good_updates_and_count_skipped_apart():
    m = loop.EpochMetrics()
    m.add({"loss": 1.0, "grad_norm": 4.0})
    m.skip()
    m.add({"loss": 0.5, "grad_norm": 2.0})
    assert m.sums == {"loss": 1.5, "grad_norm": 6.0} and m.count == 2 and m.skipped == 1
    assert m.means() == {"loss": 0.75, "grad_norm": 3.0}
    assert loop.EpochMetrics().means() == {}
    # the checkpoint form is exact: floats that have no short decimal form come back bit for bit
    m = loop.EpochMetrics({"loss": 0.1 + 0.2, "x": 1.0 / 3.0}, count=2, skipped=3)
    back = loop.EpochMetrics.from_meta(m.to_meta())
    assert back == m and back.sums["loss"] == 0.1 + 0.2


def test_best_keeps_the_lowest_finite_value_and_the_first_of_ties():
    best = loop.Best("start")
    assert not best.offer(math.nan, "nan") and not best.offer(math.inf, "inf")
    assert best.offer(2.0, "a") and not best.offer(2.0, "tie") and best.offer(1.0, "b") and not best.offer(1.5, "c")
    assert (best.params, best.value) == ("b", 1.0)


def test_early_stopping_counts_epochs_since_the_best_finite_validation():
    rows = [{"epoch": 0, "val_mean_dq": 3.0}, {"epoch": 1, "val_mean_dq": 2.0},
            {"epoch": 2, "val_mean_dq": math.nan}, {"epoch": 3, "val_mean_dq": 2.5}]
    assert loop.best_epoch(rows) == 1 and loop.best_epoch([{"epoch": 1}]) == 0
    messages = []
    stop = loop.EarlyStopping(patience=2)
    assert stop.should_stop(rows[:3], 2.0, messages.append) is False
    assert stop.should_stop(rows, 2.0, messages.append) is True
    assert messages == ["early stopping after epoch 3: validation Dq has not improved for 2 epochs "
                        "(best 2, patience 2)"]


def test_validation_is_due_every_n_epochs_and_after_the_last():
    v = loop.Validation(lambda p: {}, "loss", every_epochs=2)
    assert [e for e in range(1, 6) if v.due(e, 5)] == [2, 4, 5]


# ----------------------------------------------------------------------------- the loop


def _epochs(*per_epoch):
    """epoch_batches(epoch): the listed x values of that epoch, one float32 batch each."""
    return lambda epoch: [np.float32(x) for x in per_epoch[epoch]]


def _by_hand(w, xs, lr):
    """Plain SGD on (sqrt(w) - x)^2, in float64: the expected parameter after these updates."""
    for x in xs:
        w = w - lr * (math.sqrt(w) - x) / math.sqrt(w)
    return w


def test_too_many_nonfinite_updates_raise_a_typed_stop_carrying_the_best_parameters():
    tx = optax.apply_if_finite(optax.sgd(0.5), max_consecutive_errors=100)
    val = loop.Validation(lambda p: {"loss": float(sqrt_loss(p, 0.9))}, "loss", at_start=True)
    # epoch 1 moves w towards 0.81; in epoch 2 the first update drives w below zero, the next ones are NaN
    batches = _epochs([0.9, 0.9], [-3.0, -3.0, -3.0, -3.0])
    logged = []
    with pytest.raises(loop.TrainingStopped) as info:
        loop.run_epochs(make_update(tx), init(tx), batches, epochs=2, batches_per_epoch=2, names=NAMES,
                        best={"w": jnp.asarray(1.0)}, validation=val, guard=loop.NonFiniteGuard(1),
                        log=lambda phase, step, m: logged.append((phase, step, m.get("skipped"))))
    err = info.value
    assert isinstance(err, RuntimeError) and err.reason == "nonfinite" and err.step == 5
    assert str(err).startswith("BPTT stopped: 2 consecutive non-finite gradients at step 5 (more than "
                               "max_consecutive_bad_steps=1); keeping the best parameters (validation Dq ")
    np.testing.assert_allclose(float(err.best_params["w"]), _by_hand(1.0, [0.9, 0.9], 0.5), rtol=1e-6)
    assert err.args[1] is err.best_params
    assert [(p, s) for p, s, _ in logged] == [("bptt", 0), ("bptt_step", 1), ("bptt_step", 2), ("bptt", 1),
                                              ("bptt_step", 3), ("bptt_step", 4), ("bptt_step", 5)]
    assert [k for _, _, k in logged if k is not None] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_skipped_updates_are_left_out_of_the_epoch_means_and_counted():
    tx = optax.apply_if_finite(optax.sgd(0.5), max_consecutive_errors=100)
    state, run = loop.run_epochs(
        make_update(tx), init(tx), _epochs([0.9, 0.9], [-3.0, -3.0, -3.0, -3.0]), epochs=2, batches_per_epoch=4,
        names=NAMES, best={"w": jnp.asarray(1.0)}, guard=loop.NonFiniteGuard(5))
    w1 = _by_hand(1.0, [0.9, 0.9], 0.5)
    first, second = run.history
    w_half = _by_hand(1.0, [0.9], 0.5)
    np.testing.assert_allclose(first["train_loss"], ((1.0 - 0.9) ** 2 + (math.sqrt(w_half) - 0.9) ** 2) / 2, rtol=1e-5)
    np.testing.assert_allclose(second["train_loss"], (math.sqrt(w1) + 3.0) ** 2, rtol=1e-5)  # the one good update
    assert (second["skipped_steps"], second["nonfinite_total"]) == (3, 3.0)
    assert (first["skipped_steps"], first["nonfinite_total"]) == (0, 0.0)
    assert run.global_step == 6 and int(state.step) == 6
    assert run.best.params is not None and float(run.best.params["w"]) < 0  # no validation: the last parameters


def _resumable(tmp_path, log=loop.no_log, every=2, identity=None, seed=0):
    tx = optax.apply_if_finite(optax.adam(0.05), max_consecutive_errors=100)
    rng = np.random.default_rng(7)
    xs = rng.uniform(0.5, 1.5, size=(3, 5)).astype(np.float32)
    checkpointer = loop.Checkpointer(tmp_path, every=every, identity=identity or {"seed": seed})
    start = init(tx)
    state, progress = loop.start_or_resume(start, start.params, checkpointer, epochs=3, report=quiet)
    val = loop.Validation(lambda p: {"loss": float(sqrt_loss(p, 1.0))}, "loss", at_start=True)
    return loop.run_epochs(
        make_update(tx), state, lambda epoch: list(xs[epoch]), epochs=3, batches_per_epoch=5, names=NAMES,
        best=start.params, progress=progress, validation=val, guard=loop.NonFiniteGuard(3), checkpointer=checkpointer,
        force_batches=lambda step: np.float32(step % 3), log=log, report=quiet)


def _without_times(history):
    return [{k: v for k, v in row.items() if k != "epoch_s"} for row in history]


def test_checkpoint_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    ref_state, ref = _resumable(tmp_path / "ref", every=0)

    class Crash(Exception):
        pass

    def crash_at_8(phase, step, metrics):
        if phase == "bptt_step" and step == 8:
            raise Crash

    with pytest.raises(Crash):
        _resumable(tmp_path / "run", log=crash_at_8)
    from bptt_mlip.training import checkpoint

    assert checkpoint.checkpoint_steps(tmp_path / "run") == [4, 5, 6]  # every 2 updates and the epoch end (5)
    state, run = _resumable(tmp_path / "run")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), state, ref_state))
    assert _without_times(run.history) == _without_times(ref.history)
    assert float(run.best.params["w"]) == float(ref.best.params["w"]) and run.best.value == ref.best.value
    with pytest.raises(ValueError, match="written with seed=0, this run has seed=1"):
        _resumable(tmp_path / "run", seed=1)


def test_a_complete_checkpoint_of_another_state_layout_is_refused_and_kept(tmp_path):
    """A training checkpoint written with another parameter layout (an older version of the library,
    other settings) must not be mistaken for a corrupt one and deleted: it is refused, naming it."""
    from bptt_mlip.training import checkpoint

    old_layout = {"params": {"model": {"w": jnp.ones(3)}, "step": {"eta": jnp.asarray(0.1)}}}
    new_layout = {"params": {"model": {"w": jnp.ones(3)}, "step_rule": {"eta": jnp.asarray(0.1)}}}
    ck = tmp_path / "ck"
    checkpoint.save_training_checkpoint(ck, 7, old_layout, {"best": old_layout["params"]}, {"epoch": 1})
    with pytest.raises(checkpoint.CheckpointIncompatible, match=r"step 7 .* left in place"):
        checkpoint.restore_training_checkpoint(ck, new_layout, {"best": new_layout["params"]}, report=lambda m: None)
    assert checkpoint.checkpoint_steps(ck) == [7]
    step, state, _, meta = checkpoint.restore_training_checkpoint(ck, old_layout, {"best": old_layout["params"]})
    assert step == 7 and meta == {"epoch": 1}
