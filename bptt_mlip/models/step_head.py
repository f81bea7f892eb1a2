"""The neural step head of the paper's appendix A, as a step rule (:mod:`bptt_mlip.relax.step_rules`).

It predicts one step size per structure and frame from the standardised positions, element
descriptors and forces of the structure, so it needs the force model's
:class:`~bptt_mlip.models.adapt.Normalizer` and ADAPT's encoder block; that is why it lives with
the force models and the relaxation room imports nothing from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bptt_mlip.models.adapt import EncoderBlock, Normalizer, count_params, key_padding_mask
from bptt_mlip.relax import step_rules
from bptt_mlip.structures import Structures
from bptt_mlip.types import Params

HEAD_INPUTS = 15
"""Numbers per atom the head reads: 12 standardised model inputs and 3 standardised forces."""


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


def head_inputs(structures: Structures, forces: jnp.ndarray, normalizer: Normalizer) -> jnp.ndarray:
    """[B, N, 15] standardised (positions, descriptors, forces), zero on padded atoms."""
    raw = jnp.concatenate([structures.positions, structures.features], axis=-1)
    z = jnp.concatenate([normalizer.normalize_inputs(raw), normalizer.normalize_forces(forces)], axis=-1)
    return jnp.where(structures.mask[..., None], z, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class NeuralStep:
    """Step rule: the appendix-A head predicts eta (Å²/eV) per structure and frame.

    Attributes:
      init_step: the head's initial output (Å²/eV): training starts from this fixed step.
      d_model, num_heads, num_layers: size of the head.
      max_scale: 0 = the head's output is its linear last layer (unbounded, as in appendix A);
        ``c > 1`` = ``eta = c * init_step * sigmoid(s)``, bounded to ``(0, c * init_step)`` and
        still starting at ``init_step``. The unbounded head learned steps past the stability
        cliff in our ablation (docs/results.md).
      normalizer: the force model's standardisation statistics (None: the identity map).

    ``step_params = {"head": flax parameters}``. Equality and hash use the settings and the
    identity of ``normalizer`` (its arrays are not hashable), so a rule is a valid jit static
    argument and cache key, and two rules with different statistics never share a compiled rollout.
    """

    init_step: float = 0.077
    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 1
    max_scale: float = 0.0
    normalizer: Normalizer | None = None

    kind: ClassVar[str] = "neural"
    trainable: ClassVar[bool] = True

    def __post_init__(self):
        if self.max_scale and self.max_scale <= 1.0:
            raise ValueError(f"NeuralStep.max_scale must be 0 (unbounded) or > 1, got {self.max_scale}")

    def _settings(self) -> tuple:
        return (self.init_step, self.d_model, self.num_heads, self.num_layers, self.max_scale)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NeuralStep):
            return NotImplemented
        return self._settings() == other._settings() and self.normalizer is other.normalizer

    def __hash__(self) -> int:
        return hash((NeuralStep, self._settings(), id(self.normalizer)))

    @property
    def head(self) -> NeuralStepHead:
        return NeuralStepHead(self.d_model, self.num_heads, self.num_layers, self.init_step, self.max_scale)

    def init(self, key: jax.Array | None = None, max_atoms: int = 8) -> Params:
        key = jax.random.PRNGKey(0) if key is None else key
        z = jnp.zeros((1, max_atoms, HEAD_INPUTS), jnp.float32)
        return {"head": self.head.init(key, z, jnp.ones((1, max_atoms), bool))["params"]}

    def apply(self, step_params: Params, structures: Structures, forces: jnp.ndarray) -> jnp.ndarray:
        norm = Normalizer.identity() if self.normalizer is None else self.normalizer
        z = head_inputs(structures, forces, norm)
        return self.head.apply({"params": step_params["head"]}, z, structures.mask)

    def scalar_step_size(self, step_params: Params) -> None:
        return None

    def describe(self, step_params: Params) -> str:
        return f"neural step head ({count_params(step_params['head'])} parameters)"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "init_step": float(self.init_step), "head_d_model": self.d_model,
                "head_num_heads": self.num_heads, "head_num_layers": self.num_layers,
                "head_max_scale": float(self.max_scale)}


def neural_step_from_dict(d: dict[str, Any], normalizer: Normalizer | None) -> NeuralStep:
    """A :class:`NeuralStep` from its stored settings (``head_*`` keys; defaults for missing ones)."""
    return NeuralStep(
        init_step=float(d.get("init_step", NeuralStep.init_step)), d_model=int(d.get("head_d_model", 32)),
        num_heads=int(d.get("head_num_heads", 2)), num_layers=int(d.get("head_num_layers", 1)),
        max_scale=float(d.get("head_max_scale", 0.0)), normalizer=normalizer,
    )


step_rules.register_step_rule(NeuralStep.kind, neural_step_from_dict)
