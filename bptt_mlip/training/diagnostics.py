"""Plain checks of evaluation results: counts of what moved and what did not, and warnings.

A run can finish without an error and still mean nothing: every rollout stopped at its first
frame, FIRE converged at step 0 because the model's forces were already below ``fmax``, the
grid of step sizes was flat, the baseline was cut at ``max_frames`` long before it converged.
The functions here turn the per-structure arrays of :mod:`bptt_mlip.training.evaluate`
(``relaxation_table`` / ``fire_table`` / ``grid_table``) and the force errors of
``evaluate_forces`` into counts and into warnings, each a plain sentence with its numbers.

All functions are pure (numpy in, dicts and strings out). Per-structure inputs are dicts of
arrays over the real structures: ``dq`` [n] (amu^0.5 Å), ``dq_initial`` [n] (the Dq of not
moving at all), ``num_frames`` [n] int (frames or FIRE steps applied), ``converged`` [n] bool,
``diverged`` [n] bool. Grid inputs carry a leading step axis: [S, n].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from bptt_mlip.training import loop

NOT_MOVED_RTOL = 1e-3
"""A rollout "never moved" when its end-point Dq is within this fraction of the not-moving Dq."""
FLAT_GRID_RTOL = 1e-2
"""A grid is flat when (max - min) / min of its finite mean Dq is below this."""
ZERO_FORCE_RATIO = 0.95
"""A force model whose RMSE is at least this fraction of the zero-force RMSE has learned ~nothing."""
MOSTLY = 0.5
""""Most" rollouts: more than this fraction of them."""


def _arrays(per: Mapping, *names: str) -> list[np.ndarray]:
    missing = [n for n in names if n not in per]
    if missing:
        raise KeyError(f"per-structure results lack {missing} (have {sorted(per)})")
    return [np.asarray(per[n]) for n in names]


def not_moved(dq, dq_initial, rtol: float = NOT_MOVED_RTOL) -> np.ndarray:
    """[n] bool: end-point Dq within ``rtol`` (relative) of the Dq of not moving at all."""
    dq, dq_initial = np.asarray(dq, np.float64), np.asarray(dq_initial, np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(dq) & (np.abs(dq - dq_initial) <= rtol * np.abs(dq_initial) + 1e-12)


def relaxation_counts(per: Mapping, max_frames: int, *, not_moved_rtol: float = NOT_MOVED_RTOL) -> dict[str, int]:
    """Counts over the structures of one fixed-step / step-rule evaluation (``relaxation_table``).

    ``num_first_frame_stops``: stopped by the stopping rule within the first frame (``num_frames``
    <= 1 and converged); ``num_not_moved``: Dq equal to the not-moving Dq (needs ``dq_initial``;
    -1 without it); ``num_hit_max_frames``: ran all ``max_frames`` frames without converging or
    diverging; ``num_diverged``: runaways.
    """
    dq, frames, conv, div = _arrays(per, "dq", "num_frames", "converged", "diverged")
    conv, div = conv.astype(bool), div.astype(bool)
    moved_not = not_moved(dq, per["dq_initial"], not_moved_rtol) if "dq_initial" in per else None
    return {
        "num_structures": int(dq.size),
        "num_converged": int(conv.sum()),
        "num_first_frame_stops": int((conv & (frames <= 1)).sum()),
        "num_not_moved": -1 if moved_not is None else int(moved_not.sum()),
        "num_hit_max_frames": int((~conv & ~div & (frames >= max_frames)).sum()),
        "num_diverged": int(div.sum()),
    }


def fire_counts(per: Mapping, max_steps: int, *, not_moved_rtol: float = NOT_MOVED_RTOL) -> dict[str, int]:
    """Counts over the structures of a FIRE evaluation (``fire_table``; ``num_frames`` = FIRE steps).

    ``num_converged_at_step_0``: the largest force at the start was already below ``fmax``;
    ``num_hit_max_steps``: ran ``max_steps`` steps without converging or diverging.
    """
    dq, steps, conv, div = _arrays(per, "dq", "num_frames", "converged", "diverged")
    conv, div = conv.astype(bool), div.astype(bool)
    moved_not = not_moved(dq, per["dq_initial"], not_moved_rtol) if "dq_initial" in per else None
    return {
        "num_structures": int(dq.size),
        "num_converged": int(conv.sum()),
        "num_converged_at_step_0": int((conv & (steps == 0)).sum()),
        "num_not_moved": -1 if moved_not is None else int(moved_not.sum()),
        "num_hit_max_steps": int((~conv & ~div & (steps >= max_steps)).sum()),
        "num_diverged": int(div.sum()),
    }


def grid_counts(grid: Mapping, max_frames: int, *, flat_rtol: float = FLAT_GRID_RTOL) -> dict:
    """Shape of a grid search (``grid_table``: ``step_sizes`` [S] Å²/eV, ``mean_dq`` [S], and
    ``converged`` / ``num_frames`` / ``diverged`` [S, n]).

    ``relative_spread``: (max - min) / min of the finite ``mean_dq``; ``flat`` when it is below
    ``flat_rtol``; ``best_at_edge``: "lower", "upper" or "" (the best of >= 2 steps is the smallest
    or largest step); counts at the best step as in :func:`relaxation_counts` (no not-moving count).
    """
    steps, mean_dq = _arrays(grid, "step_sizes", "mean_dq")
    steps, mean_dq = steps.astype(np.float64), mean_dq.astype(np.float64)
    finite = np.isfinite(mean_dq)
    if not finite.any():
        return {"num_steps": int(steps.size), "best_step": None, "best_at_edge": "", "relative_spread": None,
                "flat": False, "at_best_step": None}
    best = int(np.argmin(np.where(finite, mean_dq, np.inf)))
    lo, hi = float(mean_dq[finite].min()), float(mean_dq[finite].max())
    spread = (hi - lo) / lo if lo > 0 else (0.0 if hi == lo else float("inf"))
    order = np.argsort(steps)
    edge = "" if steps.size < 2 else ("lower" if best == order[0] else "upper" if best == order[-1] else "")
    at_best = {k: np.asarray(grid[k])[best] for k in ("dq", "converged", "num_frames", "diverged") if k in grid}
    return {
        "num_steps": int(steps.size), "best_step": float(steps[best]), "best_at_edge": edge,
        "step_range": [float(steps.min()), float(steps.max())], "relative_spread": float(spread),
        "flat": bool(finite.sum() >= 2 and spread < flat_rtol),
        "at_best_step": relaxation_counts(at_best, max_frames) if len(at_best) == 4 else None,
    }


def force_counts(forces: Mapping) -> dict[str, float]:
    """``force_rmse`` and ``zero_force_rmse`` (eV/Å, from ``evaluate_forces``) and their ratio."""
    rmse, zero = float(forces["force_rmse"]), float(forces["zero_force_rmse"])
    return {"force_rmse": rmse, "zero_force_rmse": zero, "ratio_to_zero_force": rmse / zero if zero > 0 else np.inf}


def element_counts(train_species: Iterable[Iterable[int]], test_species: Iterable[Iterable[int]]) -> dict:
    """Elements (symbols) of the training and test structures (each an iterable of atomic numbers
    Z) and the test elements never seen in training."""
    from ase.data import chemical_symbols

    def symbols(groups):
        zs = sorted({int(z) for g in groups for z in np.asarray(g).ravel()})
        return [chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}" for z in zs]

    train, test = symbols(train_species), symbols(test_species)
    return {"train": train, "test": test, "unseen_in_training": [s for s in test if s not in train]}


# ---------------------------------------------------------------------------------------------- warnings


def relaxation_warnings(name: str, c: Mapping) -> list[str]:
    """Warnings of one :func:`relaxation_counts` result ``c`` of the setting ``name``."""
    n, out = c["num_structures"], []
    if c["num_first_frame_stops"]:
        out.append(f"{name}: {c['num_first_frame_stops']} of {n} test rollouts stopped at their first frame: the "
                   "stopping rule fired before the atoms had moved (stop_rms / stop_fmax loose for these data?).")
    if c["num_not_moved"] > 0:
        out.append(f"{name}: {c['num_not_moved']} of {n} test rollouts never moved (end-point Dq within "
                   f"{NOT_MOVED_RTOL:.1%} of the Dq of not moving at all).")
    if c["num_diverged"]:
        out.append(f"{name}: {c['num_diverged']} of {n} test relaxations ran away (diverged).")
    return out


def baseline_max_frames_warning(name: str, c: Mapping, max_frames: int) -> list[str]:
    """A warning when most of the baseline's rollouts (``c`` of :func:`relaxation_counts`) ended at
    ``max_frames`` without converging: its Dq is that of a rollout cut short, which can flatter it."""
    n, k = c["num_structures"], c["num_hit_max_frames"]
    if n == 0 or k <= MOSTLY * n:
        return []
    return [f"{name}: {k} of {n} test rollouts reached max_frames={max_frames} without converging: the baseline's "
            "Dq is that of relaxations cut short, which can flatter it; compare the ratio with both rollouts run to "
            "convergence."]


def fire_warnings(c: Mapping, fmax: float | None = None) -> list[str]:
    """Warnings of a :func:`fire_counts` result ``c`` (``fmax`` in eV/Å, named when given)."""
    n, out = c["num_structures"], []
    at = "" if fmax is None else f" fmax={fmax:g} eV/Å"
    if c["num_converged_at_step_0"]:
        out.append(f"FIRE: {c['num_converged_at_step_0']} of {n} runs converged at step 0: the model's largest "
                   f"force at the start was already below{at or ' fmax'}, so FIRE never moved them.")
    if c["num_diverged"]:
        out.append(f"FIRE: {c['num_diverged']} of {n} runs ran away (diverged).")
    if n and c["num_hit_max_steps"] > MOSTLY * n:
        out.append(f"FIRE: {c['num_hit_max_steps']} of {n} runs hit the step limit without reaching{at or ' fmax'}.")
    return out


def grid_warnings(c: Mapping) -> list[str]:
    """Warnings of a :func:`grid_counts` result ``c``: a flat grid, or the best step at its edge."""
    if c["best_step"] is None:
        return ["Grid search: no step size gave a finite mean Dq."]
    lo, hi = c["step_range"]
    if c["flat"]:
        return [f"Grid search is flat: mean Dq differs by only {c['relative_spread']:.2%} across the step sizes "
                f"{lo:g}-{hi:g} Å²/eV, so the step size made no difference (did the rollouts move at all?)."]
    if c["best_at_edge"]:
        return [f"The best grid step {c['best_step']:g} Å²/eV is the {c['best_at_edge']} edge of the grid "
                f"({lo:g}-{hi:g} Å²/eV): the best step may lie outside it; widen --grid_steps."]
    return []


def force_warnings(c: Mapping, name: str = "pretrained model") -> list[str]:
    """A warning when the force RMSE is no better than predicting zero force (``c`` of :func:`force_counts`)."""
    if c["ratio_to_zero_force"] < ZERO_FORCE_RATIO:
        return []
    return [f"The {name}'s force RMSE {c['force_rmse']:.4g} eV/Å is no better than predicting zero force "
            f"({c['zero_force_rmse']:.4g} eV/Å, ratio {c['ratio_to_zero_force']:.3f}): it has learned little about "
            "the forces of these structures."]


TUNED_FORCE_RATIO = 1.1
"""A fine-tuned model whose force RMSE exceeds this multiple of the pretrained model's has traded forces away."""


def tuned_force_warnings(tuned: Mapping, pretrained: Mapping) -> list[str]:
    """A warning when the fine-tuned model's force RMSE (``force_counts`` of both) is above
    ``TUNED_FORCE_RATIO`` x the pretrained model's, or no better than predicting zero force."""
    rmse, before, zero = tuned["force_rmse"], pretrained["force_rmse"], tuned["zero_force_rmse"]
    ratio = rmse / before if before > 0 else np.inf
    if ratio <= TUNED_FORCE_RATIO and rmse < zero:
        return []
    worse = f" and no better than predicting zero force ({zero:.4g} eV/Å)" if rmse >= zero else ""
    return [f"The BPTT-tuned model's force RMSE {rmse:.4g} eV/Å is {ratio:.2f}x the pretrained model's "
            f"({before:.4g}){worse}: fine-tuning traded force accuracy for end points (a force term, "
            "--force_weight, keeps the forces)."]


def kept_start_warnings(history: Sequence[Mapping], key: str = "val_mean_dq") -> list[str]:
    """A warning when fine-tuning ran at least one epoch and none beat the starting model on ``key`` (the
    validation Dq, amu^0.5 Å, of the history rows: epoch 0 is the model before training): the run then keeps
    the starting model, so the "BPTT-tuned" rows show the pretrained model unchanged."""
    scored = {int(h["epoch"]): float(h[key]) for h in history if key in h and np.isfinite(h[key])}
    trained = {e: x for e, x in scored.items() if e > 0}
    if 0 not in scored or not trained or loop.best_epoch(history, key) != 0:  # the loop's own choice of epoch
        return []
    best = min(trained, key=trained.get)
    return [f"No fine-tuning epoch lowered the validation Dq below the starting model's ({scored[0]:.4g}; best "
            f"later {trained[best]:.4g} at epoch {best} of {max(trained)}): the BPTT-tuned model is the starting "
            "model unchanged (try a smaller learning rate, or another gradient)."]


EXPLODING_GRADIENT_NORM = 1e5
"""An epoch whose mean gradient norm (before clipping) exceeds this had BPTT gradients that exploded: in the
project's ADAPT runs (docs/results.md) the epoch means of the end-point loss's gradient were of the order of 3-200."""


def exploding_gradient_warnings(history: Sequence[Mapping], key: str = "train_grad_norm") -> list[str]:
    """A warning naming the fine-tuning epochs whose mean gradient norm (``key`` of the history rows,
    measured before clipping) exceeds :data:`EXPLODING_GRADIENT_NORM`: some rollout's Jacobian product
    grew through its frames, so clipping bounded the update but those batches chose its direction."""
    rows = [(int(h["epoch"]), float(h[key])) for h in history if key in h]
    bad = [(e, g) for e, g in rows if not g <= EXPLODING_GRADIENT_NORM]  # NaN counts as exploded
    if not bad:
        return []
    epochs = ", ".join(f"epoch {e}: {g:.3g}" for e, g in bad)
    typical = [g for _, g in rows if g <= EXPLODING_GRADIENT_NORM]
    others = f"; median of the other epochs {np.median(typical):.3g}" if typical else ""
    return [f"BPTT gradients exploded: mean gradient norm above {EXPLODING_GRADIENT_NORM:.0e} in "
            f"{len(bad)} of {len(rows)} epochs ({epochs}{others}). Clipping bounded those updates, but a few "
            "unstable rollouts set their direction. Check the step against the model's stiffest mode "
            "(python -m experiments.frame_stability --run=<this run>): where step x curvature exceeds 2 at the "
            "end points, where relaxations spend most frames, the frames overshoot and the Jacobian product grows; "
            "a step clearly below the 2/curvature it prints keeps that mode from growing (a learnable step: "
            "--max_step)."]


def element_warnings(c: Mapping) -> list[str]:
    """A warning naming the test elements never seen in training (``c`` of :func:`element_counts`)."""
    if not c["unseen_in_training"]:
        return []
    return [f"Test structures contain elements never seen in training ({', '.join(c['unseen_in_training'])}; "
            f"training had {', '.join(c['train']) or 'none'}): the model's forces on them are extrapolation."]


def diagnose(
    relaxations: Mapping[str, Mapping],
    *,
    max_frames: int,
    baseline: str | None = None,
    fire: Mapping | None = None,
    fire_max_steps: int = 0,
    fire_fmax: float | None = None,
    grid: Mapping | None = None,
    pretrained_forces: Mapping | None = None,
    tuned_forces: Mapping | None = None,
    train_species: Iterable[Iterable[int]] | None = None,
    test_species: Iterable[Iterable[int]] | None = None,
    labels: Mapping[str, str] | None = None,
    bptt_history: Sequence[Mapping] | None = None,
) -> dict:
    """Counts and warnings of one evaluation, each part only when its input is given.

    Args:
      relaxations: setting name -> per-structure results of ``relaxation_table``.
      max_frames: the rollouts' frame limit.
      baseline: the name in ``relaxations`` of the pretrained baseline (best grid step), whose
        rollouts are checked for ending at ``max_frames``.
      fire: per-structure results of ``fire_table`` (``fire_max_steps``, ``fire_fmax`` eV/Å its settings).
      grid: ``grid_table`` result on the data the step was chosen on.
      pretrained_forces: ``evaluate_forces`` result of the pretrained model on test frames.
      tuned_forces: the same for the fine-tuned model (compared with ``pretrained_forces``).
      train_species, test_species: atomic numbers of each training / test structure.
      labels: name in ``relaxations`` -> the words warnings use for it (default the name).
      bptt_history: per-epoch rows of the fine-tuning (epoch 0 before training), checked for a run that
        kept its starting model (:func:`kept_start_warnings`) and for exploding gradients
        (:func:`exploding_gradient_warnings`).

    Returns:
      ``{"relaxation": {name: counts}, "fire": counts, "grid": counts, "forces": counts,
      "elements": counts, "warnings": [sentence, ...]}`` (absent parts left out).
    """
    out: dict = {"relaxation": {}}
    warnings: list[str] = []
    for name, per in relaxations.items():
        c = out["relaxation"][name] = relaxation_counts(per, max_frames)
        label = (labels or {}).get(name, name)
        warnings += relaxation_warnings(label, c)
        if name == baseline:
            warnings += baseline_max_frames_warning(label, c, max_frames)
    if baseline is not None and baseline not in relaxations:
        raise KeyError(f"baseline {baseline!r} is not one of the relaxations {list(relaxations)}")
    if fire is not None:
        out["fire"] = fire_counts(fire, fire_max_steps)
        warnings += fire_warnings(out["fire"], fire_fmax)
    if grid is not None:
        out["grid"] = grid_counts(grid, max_frames)
        warnings += grid_warnings(out["grid"])
    if pretrained_forces is not None:
        out["forces"] = force_counts(pretrained_forces)
        warnings += force_warnings(out["forces"])
        if tuned_forces is not None:
            out["tuned_forces"] = force_counts(tuned_forces)
            warnings += tuned_force_warnings(out["tuned_forces"], out["forces"])
    if train_species is not None and test_species is not None:
        out["elements"] = element_counts(train_species, test_species)
        warnings += element_warnings(out["elements"])
    if bptt_history is not None:
        warnings += kept_start_warnings(bptt_history) + exploding_gradient_warnings(bptt_history)
    out["warnings"] = warnings
    return out
