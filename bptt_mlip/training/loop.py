"""One epoch loop for every training phase, and the small pieces it is made of.

:func:`run_epochs` runs an already-built ``update(state, batch[, force_batch]) -> (state, metrics)``
over the batches of each epoch. Force pretraining and BPTT differ only in the pieces they hand it:
:class:`EpochMetrics` (sums and means of one epoch, skipped updates counted apart),
:class:`NonFiniteGuard` (updates ``optax.apply_if_finite`` skipped; :class:`TrainingStopped`, carrying
the best parameters, after too many in a row), :class:`Validation` and :class:`Best` (the best
parameters by one validation metric, lower is better), :class:`EarlyStopping`, and
:class:`Checkpointer` (every N updates and at epoch ends, only right after a good update).

Exact resume: an epoch's batch order is a pure function of the epoch (``epoch_batches``), an extra per-update
batch one of the update count (``force_batches``); a resumed run skips the batches done, restores the epoch sums
as the same floats and stops early where the uninterrupted run did: it is bit-identical to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

from bptt_mlip import progress as progress_bar
from bptt_mlip.training import optim
from bptt_mlip.types import Params

LogFn = Callable[[str, int, dict], None]
ReportFn = Callable[[str], None]


def no_log(phase: str, step: int, metrics: dict) -> None:
    return None


def to_float(metrics: dict) -> dict[str, float]:
    """Step metrics (scalar arrays) as Python floats."""
    return {k: float(v) for k, v in metrics.items()}


@dataclasses.dataclass
class EpochMetrics:
    """Running sums of the float metrics of one epoch's good updates (``count`` of them) and the
    number of ``skipped`` updates, which are left out of the sums and means."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    count: int = 0
    skipped: int = 0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def skip(self) -> None:
        self.skipped += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe and exact (floats as ``repr`` strings); the skipped count is kept as the sum ``"skipped"``."""
        sums = {**self.sums, "skipped": float(self.skipped)}
        return {"epoch_sums": {k: repr(float(v)) for k, v in sums.items()}, "epoch_n": self.count}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> EpochMetrics:
        sums = {k: float(v) for k, v in meta["epoch_sums"].items()}
        return cls(sums=sums, count=int(meta["epoch_n"]), skipped=int(sums.pop("skipped", 0.0)))


@dataclasses.dataclass
class Best:
    """The best parameters so far by a validation metric; lower is better, and a non-finite value is never best."""

    params: Params
    value: float = math.inf

    def offer(self, value: float, params: Params) -> bool:
        """Keep ``params`` if ``value`` is finite and lower than the best so far; True if kept."""
        if math.isfinite(value) and value < self.value:
            self.value, self.params = float(value), params
            return True
        return False


class TrainingStopped(RuntimeError):
    """A run stopped before its last epoch for a reason more updates would not fix. ``best_params``: the
    best parameters so far (host arrays); ``reason``: a tag (``"nonfinite"``); ``step``: updates done."""

    def __init__(self, message: str, best_params: Params, *, reason: str, step: int):
        super().__init__(message, best_params)
        self.message, self.best_params, self.reason, self.step = message, best_params, reason, int(step)

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class NonFiniteGuard:
    """Updates that ``optax.apply_if_finite`` skipped (the metric ``nonfinite_consecutive`` > 0) are
    counted; more than ``max_consecutive`` in a row raise :class:`TrainingStopped`. ``name`` and
    ``best_label`` only word the message."""

    max_consecutive: int
    name: str = "BPTT"
    best_label: str = "validation Dq"

    @staticmethod
    def skipped(metrics: dict[str, float]) -> bool:
        return metrics["nonfinite_consecutive"] > 0

    @staticmethod
    def last_update_good(state: Any) -> bool:
        return not float(optim.nonfinite_counts(state.opt_state)["nonfinite_consecutive"])

    def check(self, metrics: dict[str, float], step: int, best: Best, checkpoint_dir=None) -> None:
        """Raise :class:`TrainingStopped` if update ``step`` ends too long a run of non-finite ones."""
        bad = int(metrics["nonfinite_consecutive"])
        if bad <= self.max_consecutive:
            return
        message = (f"{self.name} stopped: {bad} consecutive non-finite gradients at step {step} (more than "
                   f"max_consecutive_bad_steps={self.max_consecutive}); keeping the best parameters "
                   f"({self.best_label} {best.value:.4g})"
                   + (f" and the last good checkpoint in {checkpoint_dir}" if checkpoint_dir is not None else ""))
        raise TrainingStopped(message, best.params, reason="nonfinite", step=step)

    @staticmethod
    def epoch_summary(state: Any, metrics: EpochMetrics) -> dict[str, float | int]:
        """Skipped updates of the epoch and of the whole run (the optimiser's count)."""
        return {"nonfinite_total": float(optim.nonfinite_counts(state.opt_state)["nonfinite_total"]),
                "skipped_steps": metrics.skipped}


def best_epoch(history: Sequence[dict], key: str = "val_mean_dq") -> int:
    """The epoch (0 = before training) of the lowest finite ``key`` in the history rows."""
    scored = [(h[key], h["epoch"]) for h in history if key in h and math.isfinite(h[key])]
    return min(scored)[1] if scored else 0


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop once the history's ``key`` has not improved for ``patience`` (> 0) epochs."""

    patience: int
    key: str = "val_mean_dq"
    label: str = "validation Dq"

    def should_stop(self, history: Sequence[dict], best_value: float, report: ReportFn) -> bool:
        epoch = history[-1]["epoch"]
        since = epoch - best_epoch(history, self.key)
        if since < self.patience:
            return False
        report(f"early stopping after epoch {epoch}: {self.label} has not improved for {since} epochs "
               f"(best {best_value:.4g}, patience {self.patience})")
        return True


@dataclasses.dataclass(frozen=True)
class Validation:
    """``evaluate(params) -> summary`` on host parameters every ``every_epochs`` epochs and after
    the last; ``summary[metric]`` (lower is better) selects the best parameters. ``at_start``:
    also before the first update (history row of epoch 0)."""

    evaluate: Callable[[Params], dict[str, float]]
    metric: str
    every_epochs: int = 1
    at_start: bool = False

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether to validate after (1-based) ``epoch`` of ``epochs``."""
        return epoch % self.every_epochs == 0 or epoch == epochs


@dataclasses.dataclass
class LoopProgress:
    """Where a run stands besides its TrainState (what a checkpoint holds to resume exactly): ``epoch``: epochs
    finished; ``batch_in_epoch``: batches of the next epoch done; ``global_step``: updates done (skipped ones
    included); ``metrics``: sums of the epoch under way."""

    best: Best
    history: list[dict] = dataclasses.field(default_factory=list)
    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    metrics: EpochMetrics = dataclasses.field(default_factory=EpochMetrics)

    def to_meta(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                **self.metrics.to_meta(), "best_val": repr(float(self.best.value)),
                "history_json": json.dumps(self.history)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], best_params: Params) -> LoopProgress:
        return cls(best=Best(best_params, float(meta["best_val"])), history=json.loads(meta["history_json"]),
                   epoch=int(meta["epoch"]), batch_in_epoch=int(meta["batch_in_epoch"]),
                   global_step=int(meta["global_step"]), metrics=EpochMetrics.from_meta(meta))


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """Resumable checkpoints (:func:`bptt_mlip.training.checkpoint.save_training_checkpoint`) in
    ``directory``: the TrainState, the best parameters and :class:`LoopProgress` as JSON. ``every``:
    updates between saves (0 = only at epoch ends); ``identity``: the settings that decide the batch
    order, which a resumed run must share; ``name`` words the messages."""

    directory: str | os.PathLike
    every: int = 0
    max_to_keep: int | None = 3
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "BPTT"

    def due(self, global_step: int) -> bool:
        return bool(self.every) and global_step % self.every == 0

    def save(self, host_state: Any, progress: LoopProgress) -> None:
        from bptt_mlip.training import checkpoint  # orbax is slow to import: only runs that save pay for it

        meta = {**self.identity, **progress.to_meta()}
        checkpoint.save_training_checkpoint(self.directory, progress.global_step, host_state,
                                            {"best": progress.best.params}, meta, max_to_keep=self.max_to_keep)

    def restore(self, state: Any, best_params: Params, *, epochs: int,
                report: ReportFn = print) -> tuple[Any, LoopProgress] | None:
        """``(state, progress)`` from the newest good checkpoint (``state``, ``best_params``: host examples of the
        structure), or None (reported) if there is none. Raises ValueError if written with another ``identity``."""
        from bptt_mlip.training import checkpoint

        restored = checkpoint.restore_training_checkpoint(self.directory, state, {"best": best_params}, report=report)
        if restored is None:
            report(f"no usable {self.name} checkpoint in {self.directory}; starting {self.name} from the beginning")
            return None
        step, state, trees, meta = restored
        for k, v in self.identity.items():
            if meta.get(k) != v:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} was written with {k}={meta.get(k)}, this run has "
                    f"{k}={v}; resume with the same settings or start a new run")
        progress = LoopProgress.from_meta(meta, trees["best"])
        where = (f"all {progress.epoch} epochs done" if progress.epoch >= epochs else
                 f"epoch {progress.epoch + 1} of {epochs}, {progress.batch_in_epoch} batches of it done")
        report(f"resuming {self.name} from checkpoint step {step}: {where}")
        return state, progress


@dataclasses.dataclass(frozen=True)
class PhaseNames:
    """How a phase shows itself: the log phase of epoch rows (``"pretrain"``, ``"bptt"``) and of
    per-update metrics (``"bptt_step"``; None: not logged), the progress-bar title (``"{bar}
    {epoch}/{epochs}"``) and the metric whose running mean the bar shows (None: none)."""

    epoch_log: str
    step_log: str | None = None
    bar: str = "epoch"
    bar_metric: str | None = None


@dataclasses.dataclass(frozen=True)
class EpochLoop:
    """The epoch loop and its pieces; see :func:`run_epochs` for the fields."""

    update: Callable[..., tuple[Any, dict]]
    epoch_batches: Callable[[int], Iterable]
    epochs: int
    batches_per_epoch: int
    names: PhaseNames
    validation: Validation | None = None
    select: Callable[[Params], Params] = lambda params: params
    host: Callable[[Any], Any] = lambda tree: tree
    guard: NonFiniteGuard | None = None
    early_stopping: EarlyStopping | None = None
    checkpointer: Checkpointer | None = None
    force_batches: Callable[[int], Any] | None = None
    row_extras: Callable[[Any, EpochMetrics], dict] | None = None
    log: LogFn = no_log
    report: ReportFn = print
    on_epoch_end: Callable[[int, Any, dict], None] | None = None

    def current(self, state: Any) -> Params:
        """The host copy of the parameters the run validates and returns."""
        return self.host(self.select(state.params))

    def run(self, state: Any, progress: LoopProgress) -> tuple[Any, LoopProgress]:
        """Train from ``progress`` (fresh or restored) to the last epoch or an early stop."""
        if self.validation is not None and self.validation.at_start and not progress.history:
            summary = self.validation.evaluate(self.current(state))
            progress.best.offer(summary[self.validation.metric], progress.best.params)
            progress.history.append({"epoch": 0, **{f"val_{k}": v for k, v in summary.items()}})
            self.log(self.names.epoch_log, 0, progress.history[-1])
        if self._stopped_early(progress):
            return state, progress
        for epoch in range(progress.epoch, self.epochs):
            t0 = time.perf_counter()
            state = self._train_epoch(state, epoch, progress)
            self._close_epoch(state, epoch, progress, t0)
            if self.early_stopping is not None and self.early_stopping.should_stop(
                    progress.history, progress.best.value, self.report):
                break
        return state, progress

    def _stopped_early(self, progress: LoopProgress) -> bool:
        """Whether a run restored at an epoch end had stopped early there (the rule depends on the history only)."""
        return (0 < progress.epoch < self.epochs and not progress.batch_in_epoch and self.early_stopping is not None
                and self.early_stopping.should_stop(progress.history, progress.best.value, self.report))

    def _train_epoch(self, state: Any, epoch: int, progress: LoopProgress) -> Any:
        bar = progress_bar.Progress(self.batches_per_epoch, f"{self.names.bar} {epoch + 1}/{self.epochs}")
        done_before = progress.batch_in_epoch
        for i, batch in enumerate(self.epoch_batches(epoch)):
            if i < done_before:  # done before the interruption
                bar.update()
                continue
            state, skipped = self._update(state, batch, progress)
            progress.batch_in_epoch = i + 1
            if self.checkpointer is not None and self.checkpointer.due(progress.global_step) and not skipped:
                self.checkpointer.save(self.host(state), progress)
            shown = self.names.bar_metric
            bar.update(**{k: v for k, v in progress.metrics.means().items() if k == shown})
        bar.close()
        return state

    def _update(self, state: Any, batch: Any, progress: LoopProgress) -> tuple[Any, bool]:
        """One update; the guard may stop the run; the epoch sums take it in or count it as skipped."""
        if self.force_batches is None:
            state, metrics = self.update(state, batch)
        else:
            state, metrics = self.update(state, batch, self.force_batches(progress.global_step))
        metrics = to_float(metrics)
        skipped = self.guard is not None and self.guard.skipped(metrics)
        progress.global_step += 1
        if self.names.step_log is not None:
            self.log(self.names.step_log, progress.global_step, {**metrics, "skipped": float(skipped)})
        if self.guard is not None:
            directory = None if self.checkpointer is None else self.checkpointer.directory
            self.guard.check(metrics, progress.global_step, progress.best, directory)
        if skipped:
            progress.metrics.skip()
        else:
            progress.metrics.add(metrics)
        return state, skipped

    def _close_epoch(self, state: Any, epoch: int, progress: LoopProgress, t0: float) -> None:
        """History row, validation and best parameters, epoch-end checkpoint, hook."""
        metrics = progress.metrics
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in metrics.means().items()}}
        if self.guard is not None:
            row.update(self.guard.epoch_summary(state, metrics))
        if self.row_extras is not None:
            row.update(self.row_extras(state, metrics))
        if self.validation is None:  # without validation data the last parameters are the result
            progress.best.params = self.current(state)
        elif self.validation.due(epoch + 1, self.epochs):
            current = self.current(state)
            summary = self.validation.evaluate(current)
            row.update({f"val_{k}": v for k, v in summary.items()})
            progress.best.offer(summary[self.validation.metric], current)
        row["epoch_s"] = time.perf_counter() - t0
        progress.history.append(row)
        self.log(self.names.epoch_log, epoch + 1, row)
        progress.epoch, progress.batch_in_epoch, progress.metrics = epoch + 1, 0, EpochMetrics()
        if self.checkpointer is not None and (self.guard is None or self.guard.last_update_good(state)):
            self.checkpointer.save(self.host(state), progress)
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch + 1, self.host(state), row)


def start_or_resume(state: Any, best: Params, checkpointer: Checkpointer | None, *, epochs: int,
                    report: ReportFn = print) -> tuple[Any, LoopProgress]:
    """``(state, progress)`` restored from ``checkpointer`` if it holds a good checkpoint, else a fresh start."""
    restored = None if checkpointer is None else checkpointer.restore(state, best, epochs=epochs, report=report)
    return restored if restored is not None else (state, LoopProgress(Best(best)))


def run_epochs(
    update: Callable[..., tuple[Any, dict]],
    state: Any,
    epoch_batches: Callable[[int], Iterable],
    *,
    epochs: int,
    batches_per_epoch: int,
    names: PhaseNames,
    best: Params,
    progress: LoopProgress | None = None,
    **pieces: Any,
) -> tuple[Any, LoopProgress]:
    """Run ``update(state, batch) -> (state, metrics)`` (``update(state, batch, force_batches(global_step))``
    with ``force_batches`` given) over ``epoch_batches(epoch)`` for ``epochs`` epochs.

    ``state``: a TrainState already placed on its devices (``host`` copies it back); ``best``: the
    parameters returned if nothing beats them; ``progress``: a restored :class:`LoopProgress` (default:
    a fresh run); ``batches_per_epoch`` sizes the progress bar. ``pieces``: the optional fields of
    :class:`EpochLoop` (``validation``, ``select`` the part of ``state.params`` validated and returned,
    ``host``, ``guard``, ``early_stopping``, ``checkpointer``, ``force_batches``, ``row_extras(state,
    epoch_metrics)``, ``log(phase, step, metrics)``, ``report(message)``, ``on_epoch_end(epoch,
    host_state, row)``). Returns ``(state, progress)``: ``progress.best.params`` the best (without
    validation: the last) parameters, ``progress.history`` one row per epoch.
    """
    loop = EpochLoop(update, epoch_batches, epochs, batches_per_epoch, names, **pieces)
    return loop.run(state, LoopProgress(Best(best)) if progress is None else progress)
