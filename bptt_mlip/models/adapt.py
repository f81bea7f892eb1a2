"""ADAPT: a Transformer-encoder force model over atoms as points in space (Flax linen).

The architecture follows the public ADAPT implementation of the paper:

* per-atom input: x, y, z (Å) plus nine element descriptors (12 numbers), standardised
  with training-set statistics ``(v - mean) / (0.3 * (std + 1e-6))`` (a column with no spread in
  training, e.g. the descriptors of a one-element set, is divided by ``0.3 * max(|mean|, 1)``
  instead: see :meth:`Normalizer.input_scale`); optionally extra sin/cos features of fractional
  coordinates (``input_encoding="xyz+fourier"``);
* embedding MLP ``12 -> 128 -> d_model -> d_model`` with ReLU between, LayerNorm, dropout;
* ``num_layers`` post-LayerNorm encoder blocks:
  ``h = LN(x + Drop(MHA(x)))``, ``out = LN(h + Drop(W2 relu(W1 h)))``; padded atoms are
  masked out of attention (as keys);
* final LayerNorm and ``Linear(d_model -> 3)``: forces are predicted directly in
  standardised units and mapped back to eV/Å with the force statistics.

No positional encoding is used, so the model is permutation-equivariant over atoms.

Two options go beyond the published model (both off by default):

* ``geometry="minimum_image"``: the periodic ADAPT of :mod:`bptt_mlip.models.periodic` (no absolute
  coordinates; attention biased by minimum-image pair distances; pairwise equivariant force
  readout). :func:`init_params`, :func:`make_force_fn` and :func:`make_train_force_fn` dispatch on it.
* ``net_force="zero"``: subtract each structure's mean force over its real atoms
  (:func:`bptt_mlip.models.constraints.remove_net_force`), so that FIRE cannot drift.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import descriptors
from bptt_mlip.models.constraints import remove_net_force
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params

if TYPE_CHECKING:
    from bptt_mlip.data.trajectory import Trajectory


MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
"""``AdaptConfig.matmul_dtype`` -> Flax ``dtype`` of Dense/attention (None: float32, Flax's default)."""

GEOMETRIES = ("cartesian", "minimum_image")
NET_FORCE_MODES = ("free", "zero")

NORM_SCALE = 0.3
NORM_EPS = 1e-6
NO_SPREAD_RTOL = 1e-4
"""An input column whose training std is at most this fraction of max(|mean|, 1) has no spread (see
:meth:`Normalizer.input_scale`). Columns of real spread sit orders of magnitude above it: element
descriptors differ between elements by percents at least, and a constant column has std 0 exactly."""


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
      geometry: ``"cartesian"`` (published: raw coordinates, no periodic boundaries) or
        ``"minimum_image"`` (the periodic ADAPT of :mod:`bptt_mlip.models.periodic`; needs
        ``input_encoding="xyz"``, whose coordinates it then does not use).
      net_force: ``"free"`` (published: forces as predicted) or ``"zero"`` (each structure's mean
        force over its real atoms is subtracted). The periodic model sums to zero either way.
      cutoff: ``"minimum_image"`` only: pair cutoff in Å; at most half the smallest perpendicular
        width of every cell it sees (``periodic.cutoff_limit``), 5.43 Å for the 64-atom Si host.
      num_radial: ``"minimum_image"`` only: Gaussian radial basis functions on [0, cutoff].
      pair_hidden: ``"minimum_image"`` only: hidden width of the pairwise force-weight MLP.
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
    geometry: str = "cartesian"
    net_force: str = "free"
    cutoff: float = 5.0
    num_radial: int = 16
    pair_hidden: int = 32

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.input_encoding not in ("xyz", "xyz+fourier"):
            raise ValueError(f"input_encoding must be 'xyz' or 'xyz+fourier', got {self.input_encoding!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype must be one of {tuple(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.net_force not in NET_FORCE_MODES:
            raise ValueError(f"net_force must be one of {NET_FORCE_MODES}, got {self.net_force!r}")
        if self.geometry == "minimum_image" and self.input_encoding != "xyz":
            raise ValueError(f"geometry='minimum_image' sees no absolute coordinates; input_encoding must stay 'xyz', "
                             f"got {self.input_encoding!r}")
        if self.cutoff <= 0 or self.num_radial < 1 or self.pair_hidden < 1:
            raise ValueError(f"cutoff, num_radial and pair_hidden must be positive: {self}")
        object.__setattr__(self, "fourier_frequencies", tuple(int(k) for k in self.fourier_frequencies))

    @property
    def num_fourier_features(self) -> int:
        return 6 * len(self.fourier_frequencies) if self.input_encoding == "xyz+fourier" else 0

    @property
    def num_inputs(self) -> int:
        """Per-atom input width the model's first layer is built for (before any radial density)."""
        if self.geometry == "minimum_image":
            return descriptors.NUM_DESCRIPTORS
        return 3 + descriptors.NUM_DESCRIPTORS + self.num_fourier_features


PUBLISHED = AdaptConfig()  # about 4 M parameters
SMALL = AdaptConfig(d_model=64, d_ff=128, num_heads=4, num_layers=2, dropout=0.0, embed_hidden=64)
TINY = AdaptConfig(d_model=16, d_ff=32, num_heads=2, num_layers=1, dropout=0.0, embed_hidden=16)
SMALL_PERIODIC = dataclasses.replace(SMALL, geometry="minimum_image")


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

    @staticmethod
    def from_arrays(arrays: dict) -> "Normalizer":
        """Statistics from their saved arrays (the fields by name), as float32."""
        return Normalizer(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})

    def scale(self, std: jnp.ndarray) -> jnp.ndarray:
        """The published divisor ``0.3 * (std + 1e-6)`` of a statistic's spread ``std``."""
        return NORM_SCALE * (std + NORM_EPS)

    def input_scale(self) -> jnp.ndarray:
        """[12] per-column divisor of the inputs.

        A column with spread in training keeps the published ``0.3 * (std + 1e-6)`` (bit for bit).
        A column without (``std <= 1e-4 max(|mean|, 1)``: the descriptors of a set with one element, where
        std is exactly 0) would be divided by 3e-7, turning an element never seen into inputs of
        order 1e7; it is divided by ``0.3 * max(|mean|, 1)`` instead, so an unseen value lands at an
        O(1) relative difference (e.g. Cu's 11 valence electrons against Si's 4: (11 - 4) / 1.2 =
        5.8). The training values themselves equal the mean and give 0 either way, so models
        trained before this rule predict exactly as before on their own elements.
        """
        magnitude = jnp.maximum(jnp.abs(self.input_mean), 1.0)
        no_spread = self.input_std <= NO_SPREAD_RTOL * magnitude
        return jnp.where(no_spread, NORM_SCALE * magnitude, self.scale(self.input_std))

    def normalize_inputs(self, inputs: jnp.ndarray) -> jnp.ndarray:
        """``(inputs - mean) / input_scale()`` of [..., 12] raw inputs (x, y, z Å and the 9 descriptors)."""
        return (inputs - self.input_mean) / self.input_scale()

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


def normalizer_from_trajectories(trajs: Sequence["Trajectory"]) -> Normalizer:
    """Fit input and force statistics over every frame of training trajectories
    (:class:`bptt_mlip.data.trajectory.Trajectory` records with forces)."""
    pos, feat, frc = [], [], []
    for t in trajs:
        if t.forces is None:
            raise ValueError(f"{t.where()}: no forces; force statistics need them")
        f = descriptors.element_features(t.species)
        pos.append(t.positions.reshape(-1, 3))
        feat.append(np.broadcast_to(f, (t.num_frames,) + f.shape).reshape(-1, f.shape[-1]))
        frc.append(t.forces.reshape(-1, 3))
    p, ft, fr = np.concatenate(pos), np.concatenate(feat), np.concatenate(frc)
    return fit_normalizer(p, ft, fr, np.ones(p.shape[0], bool))


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
    """Post-LayerNorm Transformer encoder block with a key padding mask.

    ``attn_bias`` (optional, [B, H, N, N]) is added to the attention logits before the softmax
    (the periodic ADAPT's pair-distance bias); without it the block is the published one.
    """

    d_model: int
    d_ff: int
    num_heads: int
    dropout: float
    dtype: Any = None  # computation dtype of Dense/attention (None: float32); LayerNorms stay float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, attn_mask: jnp.ndarray, deterministic: bool, attn_bias: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        ln_dtype = None if self.dtype is None else jnp.float32
        attention_fn = nn.dot_product_attention
        if attn_bias is not None:
            attention_fn = functools.partial(nn.dot_product_attention, bias=attn_bias)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, out_features=self.d_model, dtype=self.dtype,
            attention_fn=attention_fn, name="attention",
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
    """Standardised per-atom inputs of the cartesian model [B, N, config.num_inputs]; zeros on padded atoms."""
    raw = jnp.concatenate([structures.positions, structures.features], axis=-1)
    x = normalizer.normalize_inputs(raw)
    if config.input_encoding == "xyz+fourier":
        x = jnp.concatenate(
            [x, fractional_fourier_features(structures.positions, structures.cell, config.fourier_frequencies)], axis=-1
        )
    return jnp.where(structures.mask[..., None], x, 0.0)


def init_params(config: AdaptConfig, key: jax.Array, max_atoms: int = 8) -> Params:
    """Random ADAPT parameters (Flax default initialisers), for either geometry."""
    if config.geometry == "minimum_image":
        from bptt_mlip.models import periodic  # imported here: periodic builds on this module's blocks

        return periodic.init_periodic_params(config, key, max_atoms)
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
    """ADAPT forces in eV/Å, [B, N, 3] (either geometry); exactly zero on padded atoms."""
    chex.assert_rank(structures.positions, 3)
    if config.geometry == "minimum_image":
        from bptt_mlip.models import periodic  # imported here: periodic builds on this module's blocks

        forces = periodic.periodic_forces(
            params, structures, config, normalizer, deterministic=deterministic, dropout_key=dropout_key
        )
    else:
        inputs = model_inputs(structures, normalizer, config)
        rngs = None if deterministic else {"dropout": dropout_key}
        out = Adapt(config).apply({"params": params}, inputs, structures.mask, deterministic, rngs=rngs)
        forces = jnp.where(structures.mask[..., None], normalizer.denormalize_forces(out), 0.0)
    if config.net_force == "zero":
        forces = remove_net_force(forces, structures.mask)
    return forces


def make_force_fn(config: AdaptConfig, normalizer: Normalizer) -> ForceFn:
    """Bind config and statistics: returns ``force_fn(params, structures) -> forces [B, N, 3]`` (eV/Å),
    for either geometry and with the config's net-force option applied."""

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
