"""Differentiable relaxation: the frame rule, step-size rules and a masked ``lax.scan`` rollout.

A frame (paper eq. 1) is ``X_{t+1} = X_t + eta_t * F(X_t)`` for every structure of a batch.
A rollout repeats frames up to ``max_frames`` times. Each structure stops on its own when the
RMS movement of its real atoms in one frame falls below ``stop_rms`` (paper: 1e-3 Å); from
then on its positions are frozen, so later frames change neither its value nor its gradient.
The stopping test is computed on stop-gradient values and is not differentiated. Early
stopping is a mask over a fixed-length ``scan`` because ``while_loop`` cannot be
reverse-differentiated.

Parameters are one pytree ``{"model": model_params, "step": step_params}``. ``force_fn(
params["model"], structures)`` may be any force model (ADAPT, a user's Flax model, a
jax-md potential, the negative gradient of a learned energy).

Units: positions Å, forces eV/Å, step sizes Å^2/eV (Å of movement per eV/Å of force).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bptt_mlip import losses
from bptt_mlip.models.adapt import EncoderBlock, Normalizer, key_padding_mask
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params

StepSizeFn = Callable[[Params, Structures, jnp.ndarray], jnp.ndarray]
"""``step_size_fn(step_params, structures, forces) -> [B]`` step size of this frame (before annealing)."""

STEP_KINDS = ("fixed", "learnable", "neural")
REMAT_MODES = ("none", "frame", "segment")
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How a frame turns forces into a displacement.

    Attributes:
      kind: ``"fixed"`` (eta not trained), ``"learnable"`` (scalar eta trained with the model),
        ``"neural"`` (the step-size head of the paper's appendix A predicts eta per structure
        and frame from structure and forces).
      init_step: initial (or fixed) eta in Å^2/eV; for ``"neural"`` the head's initial output.
      momentum: heavy-ball weight beta: ``u_t = eta_t F_t + beta u_{t-1}`` (paper: 0.05; 0 = off).
      anneal: multiplicative annealing gamma: ``eta_t = eta * gamma^t`` (paper: 0.99; 1 = off).
      noise_std: std (Å) of Gaussian exploration noise added to every real atom's update
        (needs a key; 0 = off).
      max_displacement: cap (Å) on each atom's displacement per frame (0 = no cap).
      head_d_model, head_num_heads, head_num_layers: size of the neural step head.
      head_max_scale: 0 = the head's output is its linear last layer (unbounded, as in appendix
        A); ``c > 1`` = ``eta = c * init_step * sigmoid(s)``, bounded to ``(0, c * init_step)``
        and still starting at ``init_step``. The unbounded head learned steps past the
        stability cliff in our ablation (docs/results.md).
    """

    kind: str = "fixed"
    init_step: float = 0.077
    momentum: float = 0.0
    anneal: float = 1.0
    noise_std: float = 0.0
    max_displacement: float = 0.0
    head_d_model: int = 32
    head_num_heads: int = 2
    head_num_layers: int = 1
    head_max_scale: float = 0.0

    def __post_init__(self):
        if self.kind not in STEP_KINDS:
            raise ValueError(f"StepConfig.kind must be one of {STEP_KINDS}, got {self.kind!r}")
        if self.head_max_scale and self.head_max_scale <= 1.0:
            raise ValueError(f"StepConfig.head_max_scale must be 0 (unbounded) or > 1, got {self.head_max_scale}")
        if self.noise_std < 0 or self.max_displacement < 0 or self.momentum < 0 or self.anneal <= 0:
            raise ValueError(f"invalid StepConfig values: {self}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Rollout length, stopping rule and rematerialisation.

    Attributes:
      max_frames: K, the most frames a structure may take (paper: 75 defects, 45 crystals).
      stop_rms: a structure stops once the RMS displacement of its real atoms in one frame is
        below this (Å; paper: 1e-3).
      remat: ``"none"`` (store every frame's activations), ``"frame"`` (``jax.checkpoint`` each
        frame: recompute a frame's model activations in the backward pass), or ``"segment"``
        (checkpoint segments of ``segment_length`` frames, each frame inside also checkpointed:
        memory ~ K / S + S frames, about sqrt(K) for S = sqrt(K)).
      segment_length: S for ``"segment"``; 0 picks ceil(sqrt(max_frames)).
      remat_policy: a name in ``REMAT_POLICIES`` for what a checkpointed frame may keep.
      divergence_displacement: a frame that would move an atom farther than this (Å), or makes
        positions non-finite, marks the structure diverged and freezes it at its last good frame.
      return_trajectory: also return positions after every frame, [K + 1, B, N, 3].
    """

    max_frames: int = 75
    stop_rms: float = 1e-3
    remat: str = "none"
    segment_length: int = 0
    remat_policy: str = "nothing_saveable"
    divergence_displacement: float = 5.0
    return_trajectory: bool = False

    def __post_init__(self):
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got {self.remat_policy!r}")

    @property
    def segment(self) -> int:
        if self.remat != "segment":
            return self.max_frames
        s = self.segment_length or math.ceil(math.sqrt(self.max_frames))
        return max(1, min(s, self.max_frames))


class RolloutResult(NamedTuple):
    """What a rollout returns.

    Attributes:
      positions: [B, N, 3] end-point positions (Å).
      num_frames: [B] int32 frames actually applied to each structure.
      converged: [B] bool, stopped by the RMS-movement rule.
      diverged: [B] bool, stopped because a frame turned non-finite or moved an atom too far.
      last_rms: [B] RMS displacement (Å) of the structure's last applied frame.
      trajectory: [K + 1, B, N, 3] positions after each frame (frozen after the stop), or None.
    """

    positions: jnp.ndarray
    num_frames: jnp.ndarray
    converged: jnp.ndarray
    diverged: jnp.ndarray
    last_rms: jnp.ndarray
    trajectory: jnp.ndarray | None


# --------------------------------------------------------------------------- step-size rules


class NeuralStepHead(nn.Module):
    """Scalar step-size decoder of the paper's appendix A.

    ``Z = [inputs | forces]`` (15 standardised numbers per atom) is lifted by a residual MLP
    ``H = W2 Z + W1 relu(W0 Z)``, encoded by ``num_layers`` encoder blocks into ``M``; a query of
    ones attends over M: ``h0 = LN(q + Attn(q, M, M))``, ``h1 = LN(h0 + MLP(h0))``, ``s = W h1 + b``.
    The last layer starts at zero weight and bias ``init_step``, so training starts from the
    fixed step ``init_step``.
    """

    d_model: int
    num_heads: int
    num_layers: int
    init_step: float
    max_scale: float = 0.0

    @nn.compact
    def __call__(self, z: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        d = self.d_model
        h = nn.Dense(d, name="lift_linear")(z) + nn.Dense(d, name="lift_out")(nn.relu(nn.Dense(d, name="lift_in")(z)))
        attn_mask = key_padding_mask(mask)
        for i in range(self.num_layers):
            h = EncoderBlock(d, 2 * d, self.num_heads, 0.0, name=f"block_{i}")(h, attn_mask, True)
        q = jnp.ones((z.shape[0], 1, d), z.dtype)
        cross = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="query_attention")(
            q, h, mask=mask[:, None, None, :]
        )
        h0 = nn.LayerNorm(name="norm0")(q + cross)
        h1 = nn.LayerNorm(name="norm1")(h0 + nn.Dense(d, name="mlp_out")(nn.relu(nn.Dense(2 * d, name="mlp_in")(h0))))
        # zero kernel: the first output is the bias, chosen so that eta starts at init_step
        bias = self.init_step if not self.max_scale else -math.log(self.max_scale - 1.0)  # sigmoid(b) = 1/c
        s = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(bias), name="out")(h1)
        s = s[:, 0, 0]
        return s if not self.max_scale else self.max_scale * self.init_step * jax.nn.sigmoid(s)


def _head(step_config: StepConfig) -> NeuralStepHead:
    return NeuralStepHead(
        step_config.head_d_model, step_config.head_num_heads, step_config.head_num_layers, step_config.init_step,
        step_config.head_max_scale,
    )


def _head_inputs(structures: Structures, forces: jnp.ndarray, normalizer: Normalizer) -> jnp.ndarray:
    raw = jnp.concatenate([structures.positions, structures.features], axis=-1)
    z = jnp.concatenate([normalizer.normalize_inputs(raw), normalizer.normalize_forces(forces)], axis=-1)
    return jnp.where(structures.mask[..., None], z, 0.0)


def init_step_params(step_config: StepConfig, key: jax.Array | None = None, max_atoms: int = 8) -> Params:
    """Initial step parameters: ``{"eta": scalar}`` or, for ``"neural"``, ``{"head": params}``."""
    if step_config.kind != "neural":
        return {"eta": jnp.asarray(step_config.init_step, jnp.float32)}
    key = jax.random.PRNGKey(0) if key is None else key
    z = jnp.zeros((1, max_atoms, 15), jnp.float32)
    return {"head": _head(step_config).init(key, z, jnp.ones((1, max_atoms), bool))["params"]}


def make_step_size_fn(step_config: StepConfig, normalizer: Normalizer | None = None) -> StepSizeFn:
    """The step rule's ``step_size_fn(step_params, structures, forces) -> [B]`` (Å^2/eV)."""
    if step_config.kind != "neural":

        def scalar(step_params, structures, forces):
            eta = step_params["eta"]
            if step_config.kind == "fixed":
                eta = jax.lax.stop_gradient(eta)
            return jnp.broadcast_to(eta, structures.positions.shape[:1])

        return scalar

    norm = Normalizer.identity() if normalizer is None else normalizer
    head = _head(step_config)

    def neural(step_params, structures, forces):
        return head.apply({"params": step_params["head"]}, _head_inputs(structures, forces, norm), structures.mask)

    return neural


# --------------------------------------------------------------------------- frame and rollout


def displacement(
    forces: jnp.ndarray,
    step_size: jnp.ndarray,
    mask: jnp.ndarray,
    step_config: StepConfig,
    previous: jnp.ndarray | None = None,
    noise: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """One frame's displacement [B, N, 3] (Å): ``eta F (+ beta u_prev) (+ noise)``, capped, masked.

    Args:
      forces: [B, N, 3] eV/Å. step_size: [B] Å^2/eV. mask: [B, N].
      previous: [B, N, 3] the previous frame's displacement (momentum), or None.
      noise: [B, N, 3] standard-normal draws scaled by ``step_config.noise_std``, or None.
    """
    update = step_size[:, None, None] * forces
    if previous is not None and step_config.momentum:
        update = update + step_config.momentum * previous
    if noise is not None and step_config.noise_std:
        update = update + step_config.noise_std * noise
    if step_config.max_displacement:
        norm = losses.safe_norm(update, keepdims=True)
        scale = jnp.minimum(1.0, step_config.max_displacement / jnp.maximum(norm, 1e-12))
        update = update * scale
    return jnp.where(mask[..., None], update, 0.0)


def frame(
    force_fn: ForceFn,
    step_size_fn: StepSizeFn,
    params: Params,
    structures: Structures,
    step_config: StepConfig = StepConfig(),
) -> jnp.ndarray:
    """The paper's frame (eq. 1) without momentum/noise: returns ``X + eta F(X)`` [B, N, 3]."""
    forces = force_fn(params["model"], structures)
    eta = step_size_fn(params["step"], structures, forces)
    return structures.positions + displacement(forces, eta, structures.mask, step_config)


def rms_displacement(update: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B] root-mean-square over real atoms of per-atom displacement norms (Å)."""
    n = jnp.maximum(jnp.sum(mask, axis=-1), 1)
    return losses.safe_sqrt(jnp.sum(jnp.where(mask[..., None], update * update, 0.0), axis=(-1, -2)) / n)


class _Carry(NamedTuple):
    positions: jnp.ndarray
    previous: jnp.ndarray
    done: jnp.ndarray
    converged: jnp.ndarray
    diverged: jnp.ndarray
    num_frames: jnp.ndarray
    last_rms: jnp.ndarray


def rollout(
    force_fn: ForceFn,
    step_size_fn: StepSizeFn,
    params: Params,
    structures: Structures,
    step_config: StepConfig = StepConfig(),
    rollout_config: RolloutConfig = RolloutConfig(),
    *,
    key: jax.Array | None = None,
    stop_rms: jnp.ndarray | float | None = None,
    frame_limit: jnp.ndarray | int | None = None,
) -> RolloutResult:
    """Relax every structure of the batch with repeated frames; differentiable in ``params``.

    Args:
      force_fn: ``force_fn(params["model"], structures) -> [B, N, 3]`` eV/Å.
      step_size_fn: from :func:`make_step_size_fn`.
      params: ``{"model": ..., "step": ...}``.
      structures: batch with starting positions [B, N, 3].
      key: PRNG key for exploration noise (required iff ``step_config.noise_std > 0``).
      stop_rms: overrides ``rollout_config.stop_rms`` with a traced value (random stopping rules).
      frame_limit: a traced limit <= ``max_frames`` on the frames taken (random stopping rules).
    """
    if step_config.noise_std and key is None:
        raise ValueError("StepConfig.noise_std > 0 needs a PRNG key for the exploration noise")
    k_max = rollout_config.max_frames
    threshold = rollout_config.stop_rms if stop_rms is None else stop_rms
    limit = k_max if frame_limit is None else jnp.minimum(frame_limit, k_max)
    mask = structures.mask
    b = structures.batch_size

    def body(carry: _Carry, t: jnp.ndarray):
        current = structures.replace(positions=carry.positions)
        forces = force_fn(params["model"], current)
        eta = step_size_fn(params["step"], current, forces)
        if step_config.anneal != 1.0:
            eta = eta * step_config.anneal ** t.astype(eta.dtype)
        noise = None
        if step_config.noise_std:
            noise = jax.random.normal(jax.random.fold_in(key, t), carry.positions.shape, carry.positions.dtype)
        update = displacement(forces, eta, mask, step_config, carry.previous, noise)
        active = jnp.logical_not(carry.done) & (t < limit)
        moved = carry.positions + update
        rms = jax.lax.stop_gradient(rms_displacement(update, mask))
        biggest = jax.lax.stop_gradient(jnp.max(jnp.where(mask[..., None], jnp.abs(update), 0.0), axis=(-1, -2)))
        bad = jnp.logical_not(jnp.isfinite(biggest)) | (biggest > rollout_config.divergence_displacement)
        newly_diverged = active & bad
        step_ok = active & jnp.logical_not(bad)
        newly_converged = step_ok & (rms < threshold)
        positions = jnp.where(step_ok[:, None, None], moved, carry.positions)
        new = _Carry(
            positions=positions,
            previous=jnp.where(step_ok[:, None, None], update, carry.previous),
            done=carry.done | newly_converged | newly_diverged,
            converged=carry.converged | newly_converged,
            diverged=carry.diverged | newly_diverged,
            num_frames=carry.num_frames + step_ok.astype(jnp.int32),
            last_rms=jnp.where(step_ok, rms, carry.last_rms),
        )
        return new, (positions if rollout_config.return_trajectory else None)

    policy = REMAT_POLICIES[rollout_config.remat_policy]
    if rollout_config.remat in ("frame", "segment"):
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)

    init = _Carry(
        positions=structures.positions,
        previous=jnp.zeros_like(structures.positions),
        done=jnp.zeros((b,), bool),
        converged=jnp.zeros((b,), bool),
        diverged=jnp.zeros((b,), bool),
        num_frames=jnp.zeros((b,), jnp.int32),
        last_rms=jnp.zeros((b,), structures.positions.dtype),
    )
    if rollout_config.remat == "segment":
        seg = rollout_config.segment
        n_seg = -(-k_max // seg)

        @jax.checkpoint
        def segment_body(carry, seg_index):
            return jax.lax.scan(body, carry, seg_index * seg + jnp.arange(seg))

        # Frames with t >= k_max (the last segment's overhang) are inactive by the limit test.
        carry, frames = jax.lax.scan(segment_body, init, jnp.arange(n_seg))
        if frames is not None:
            frames = frames.reshape((n_seg * seg,) + frames.shape[2:])[:k_max]
    else:
        carry, frames = jax.lax.scan(body, init, jnp.arange(k_max))

    trajectory = None
    if rollout_config.return_trajectory:
        trajectory = jnp.concatenate([structures.positions[None], frames], axis=0)
    return RolloutResult(carry.positions, carry.num_frames, carry.converged, carry.diverged, carry.last_rms, trajectory)
