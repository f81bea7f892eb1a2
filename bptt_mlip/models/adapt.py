"""ADAPT: a Transformer-encoder force model over atoms as points in space (Flax linen).

The architecture follows the public ADAPT implementation (see ``shared/DESIGN.md``):

* per-atom input: x, y, z (Å) plus nine element descriptors (12 numbers), standardised
  with training-set statistics ``(v - mean) / (0.3 * (std + 1e-6))``; optionally extra
  sin/cos features of fractional coordinates (``input_encoding="xyz+fourier"``);
* embedding MLP ``12 -> 128 -> d_model -> d_model`` with ReLU between, LayerNorm, dropout;
* ``num_layers`` post-LayerNorm encoder blocks:
  ``h = LN(x + Drop(MHA(x)))``, ``out = LN(h + Drop(W2 relu(W1 h)))``; padded atoms are
  masked out of attention (as keys);
* final LayerNorm and ``Linear(d_model -> 3)``: forces are predicted directly in
  standardised units and mapped back to eV/Å with the force statistics.

No positional encoding is used, so the model is permutation-equivariant over atoms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import descriptors
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params


MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
"""``AdaptConfig.matmul_dtype`` -> Flax ``dtype`` of Dense/attention (None: float32, Flax's default)."""

NORM_SCALE = 0.3
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Static ADAPT hyper-parameters (hashable: usable as a jit static argument).

    Attributes:
      d_model: width of the token representation.
      d_ff: hidden width of each encoder block's feed-forward network.
      num_heads: attention heads (must divide d_model).
      num_layers: number of encoder blocks.
      dropout: dropout rate (active only when ``deterministic=False``).
      embed_hidden: hidden width of the first embedding layer (128 in ADAPT).
      input_encoding: ``"xyz"`` (published: raw Cartesian coordinates) or ``"xyz+fourier"``
        (adds sin/cos of fractional coordinates at ``fourier_frequencies``; needs a cell).
      fourier_frequencies: integer frequencies k of sin(2 pi k s), cos(2 pi k s).
      matmul_dtype: ``"float32"`` (default) or ``"bfloat16"``: the dtype the Dense layers and
        attention compute in. Parameters, LayerNorms, the final Dense(3) force head and everything
        outside the model stay float32 (see docs/performance.md for the effect on Dq and speed).
    """

    d_model: int = 256
    d_ff: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dropout: float = 0.05
    embed_hidden: int = 128
    input_encoding: str = "xyz"
    fourier_frequencies: tuple[int, ...] = (1, 2, 4, 8)
    matmul_dtype: str = "float32"

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.input_encoding not in ("xyz", "xyz+fourier"):
            raise ValueError(f"input_encoding must be 'xyz' or 'xyz+fourier', got {self.input_encoding!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {tuple(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        object.__setattr__(self, "fourier_frequencies", tuple(int(k) for k in self.fourier_frequencies))

    @property
    def num_fourier_features(self) -> int:
        return 6 * len(self.fourier_frequencies) if self.input_encoding == "xyz+fourier" else 0

    @property
    def num_inputs(self) -> int:
        return 3 + descriptors.NUM_DESCRIPTORS + self.num_fourier_features


PUBLISHED = AdaptConfig()  # about 4 M parameters
SMALL = AdaptConfig(d_model=64, d_ff=128, num_heads=4, num_layers=2, dropout=0.0, embed_hidden=64)
TINY = AdaptConfig(d_model=16, d_ff=32, num_heads=2, num_layers=1, dropout=0.0, embed_hidden=16)


@flax.struct.dataclass
class Normalizer:
    """Training-set standardisation statistics.

    Attributes:
      input_mean, input_std: [12] per-column statistics of (x, y, z, 9 descriptors).
      force_mean, force_std: [3] per-component statistics of reference forces (eV/Å).
    """

    input_mean: jnp.ndarray
    input_std: jnp.ndarray
    force_mean: jnp.ndarray
    force_std: jnp.ndarray

    @staticmethod
    def identity() -> "Normalizer":
        """Statistics that make the standardisation the identity map (for tests and toy models)."""
        n = 3 + descriptors.NUM_DESCRIPTORS
        unit = 1.0 / NORM_SCALE - NORM_EPS
        return Normalizer(
            input_mean=jnp.zeros(n), input_std=jnp.full(n, unit), force_mean=jnp.zeros(3), force_std=jnp.full(3, unit)
        )

    def scale(self, std: jnp.ndarray) -> jnp.ndarray:
        return NORM_SCALE * (std + NORM_EPS)

    def normalize_inputs(self, inputs: jnp.ndarray) -> jnp.ndarray:
        return (inputs - self.input_mean) / self.scale(self.input_std)

    def normalize_forces(self, forces: jnp.ndarray) -> jnp.ndarray:
        return (forces - self.force_mean) / self.scale(self.force_std)

    def denormalize_forces(self, forces: jnp.ndarray) -> jnp.ndarray:
        return forces * self.scale(self.force_std) + self.force_mean


def fit_normalizer(positions: np.ndarray, features: np.ndarray, forces: np.ndarray, mask: np.ndarray) -> Normalizer:
    """Compute :class:`Normalizer` statistics over the real atoms of a training set.

    Args:
      positions: [..., N, 3] Å; features: [..., N, 9]; forces: [..., N, 3] eV/Å; mask: [..., N] bool.
    """
    mask = np.asarray(mask, bool)
    inputs = np.concatenate([np.asarray(positions), np.asarray(features)], axis=-1)[mask]
    f = np.asarray(forces)[mask]
    if inputs.shape[0] == 0:
        raise ValueError("fit_normalizer: no real atoms in the training set")
    return Normalizer(
        input_mean=jnp.asarray(inputs.mean(0), jnp.float32),
        input_std=jnp.asarray(inputs.std(0), jnp.float32),
        force_mean=jnp.asarray(f.mean(0), jnp.float32),
        force_std=jnp.asarray(f.std(0), jnp.float32),
    )


def fractional_fourier_features(positions: jnp.ndarray, cell: jnp.ndarray, frequencies: tuple[int, ...]) -> jnp.ndarray:
    """sin/cos(2 pi k s) of fractional coordinates s = x @ inv(cell); [B, N, 6 * len(frequencies)].

    A zero cell (non-periodic structure) gives zeros for every feature.
    """
    det = jnp.linalg.det(cell)
    periodic = jnp.abs(det) > 1e-6
    safe_cell = jnp.where(periodic[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))
    frac = jnp.einsum("bni,bij->bnj", positions, jnp.linalg.inv(safe_cell))
    k = jnp.asarray(frequencies, positions.dtype)
    angles = 2.0 * jnp.pi * frac[..., None] * k  # [B, N, 3, F]
    feats = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape[:2], -1)
    return jnp.where(periodic[:, None, None], feats, 0.0)


class EncoderBlock(nn.Module):
    """Post-LayerNorm Transformer encoder block with a key padding mask."""

    d_model: int
    d_ff: int
    num_heads: int
    dropout: float
    dtype: Any = None  # computation dtype of Dense/attention (None: float32); LayerNorms stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, attn_mask: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        ln_dtype = None if self.dtype is None else jnp.float32
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, out_features=self.d_model, dtype=self.dtype,
            name="attention",
        )(x, x, mask=attn_mask, deterministic=True)
        h = nn.LayerNorm(dtype=ln_dtype, name="norm1")(x + nn.Dropout(self.dropout)(attn, deterministic=deterministic))
        ff = nn.Dense(self.d_model, dtype=self.dtype, name="ff_out")(
            nn.relu(nn.Dense(self.d_ff, dtype=self.dtype, name="ff_in")(h))
        )
        return nn.LayerNorm(dtype=ln_dtype, name="norm2")(h + nn.Dropout(self.dropout)(ff, deterministic=deterministic))


def key_padding_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """[B, N] atom mask -> [B, 1, 1, N] attention mask over keys (queries attend to real atoms only)."""
    return mask[:, None, None, :]


class Adapt(nn.Module):
    """ADAPT force model. Input: standardised per-atom features [B, N, F]; output: standardised forces [B, N, 3]."""

    config: AdaptConfig

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, mask: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        cfg = self.config
        dt = MATMUL_DTYPES[cfg.matmul_dtype]
        ln_dtype = None if dt is None else jnp.float32
        x = nn.relu(nn.Dense(cfg.embed_hidden, dtype=dt, name="embed_0")(inputs))
        x = nn.relu(nn.Dense(cfg.d_model, dtype=dt, name="embed_1")(x))
        x = nn.Dense(cfg.d_model, dtype=dt, name="embed_2")(x)
        x = nn.Dropout(cfg.dropout)(nn.LayerNorm(dtype=ln_dtype, name="embed_norm")(x), deterministic=deterministic)
        attn_mask = key_padding_mask(mask)
        for i in range(cfg.num_layers):
            x = EncoderBlock(cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.dropout, dtype=dt, name=f"block_{i}")(
                x, attn_mask, deterministic
            )
        x = nn.LayerNorm(dtype=ln_dtype, name="final_norm")(x)
        return nn.Dense(3, name="force_head")(x)  # the small force head stays float32


def model_inputs(structures: Structures, normalizer: Normalizer, config: AdaptConfig) -> jnp.ndarray:
    """Standardised per-atom model inputs [B, N, config.num_inputs]; zeros on padded atoms."""
    raw = jnp.concatenate([structures.positions, structures.features], axis=-1)
    x = normalizer.normalize_inputs(raw)
    if config.input_encoding == "xyz+fourier":
        x = jnp.concatenate(
            [x, fractional_fourier_features(structures.positions, structures.cell, config.fourier_frequencies)], axis=-1
        )
    return jnp.where(structures.mask[..., None], x, 0.0)


def init_params(config: AdaptConfig, key: jax.Array, max_atoms: int = 8) -> Params:
    """Random ADAPT parameters (Flax default initialisers)."""
    dummy = jnp.zeros((1, max_atoms, config.num_inputs), jnp.float32)
    return Adapt(config).init(key, dummy, jnp.ones((1, max_atoms), bool))["params"]


def adapt_forces(
    params: Params,
    structures: Structures,
    config: AdaptConfig,
    normalizer: Normalizer,
    *,
    deterministic: bool = True,
    dropout_key: jax.Array | None = None,
) -> jnp.ndarray:
    """ADAPT forces in eV/Å, [B, N, 3]; exactly zero on padded atoms."""
    chex.assert_rank(structures.positions, 3)
    inputs = model_inputs(structures, normalizer, config)
    rngs = None if deterministic else {"dropout": dropout_key}
    out = Adapt(config).apply({"params": params}, inputs, structures.mask, deterministic, rngs=rngs)
    forces = normalizer.denormalize_forces(out)
    return jnp.where(structures.mask[..., None], forces, 0.0)


def make_force_fn(config: AdaptConfig, normalizer: Normalizer) -> ForceFn:
    """Bind config and statistics: returns ``force_fn(params, structures) -> forces [B, N, 3]`` (eV/Å)."""

    def force_fn(params: Params, structures: Structures) -> jnp.ndarray:
        return adapt_forces(params, structures, config, normalizer)

    return force_fn


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def make_train_force_fn(config: AdaptConfig, normalizer: Normalizer):
    """Like :func:`make_force_fn` but with dropout active: ``force_fn(params, structures, key)``."""

    def force_fn(params: Params, structures: Structures, key: jax.Array) -> jnp.ndarray:
        if config.dropout == 0.0:
            return adapt_forces(params, structures, config, normalizer)
        return adapt_forces(params, structures, config, normalizer, deterministic=False, dropout_key=key)

    return force_fn
