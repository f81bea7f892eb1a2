"""Periodic ADAPT: the ADAPT Transformer over atoms, seeing only minimum-image pair geometry.

Selected with ``AdaptConfig(geometry="minimum_image")``; :func:`bptt_mlip.models.adapt.init_params`,
``make_force_fn`` and ``make_train_force_fn`` dispatch here. Differences from the published
(``"cartesian"``) model:

* per-atom input: the nine standardised element descriptors (no absolute coordinates) and a
  radial neighbour density ``log(1 + sum_j phi_k(d_ij))`` over the K radial basis functions;
* every encoder block's attention logits get a learned per-head bias ``W_l phi(d_ij)`` from
  the minimum-image pair distances d_ij (zero beyond the cutoff and for i = j);
* forces are read out equivariantly: ``F_i = sum_j w_ij r_ij / d_ij`` over real j != i with
  d_ij < cutoff, where ``r_ij = x_j - x_i`` (minimum image, Å) and ``w_ij`` is a small MLP of
  (h_i, h_j, phi(d_ij)), symmetrised (w_ij = w_ji) and multiplied by a smooth cosine envelope.
  Because r_ji = -r_ij the forces of every structure sum to zero by construction.

The model is therefore invariant to translating all atoms and to wrapping an atom across a cell
face, and rotating positions and cell together rotates its forces. Cell rows are lattice vectors
in Å; a zero cell means a non-periodic structure (plain distances). The minimum image is exact
only while the cutoff is at most half the smallest perpendicular width of the cell
(:func:`cutoff_limit` computes that bound on the host).

Standardised forces are mapped back to eV/Å with one isotropic scale (the RMS of the per-component
force spreads) and no mean shift: a per-component scale or a constant offset would break rotation
equivariance and the zero net force.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from bptt_mlip import losses
from bptt_mlip.models.adapt import MATMUL_DTYPES, AdaptConfig, EncoderBlock, Normalizer, key_padding_mask
from bptt_mlip.structures import Structures
from bptt_mlip.types import Params

NUM_COORDINATES = 3  # the Normalizer's first three input columns are x, y, z, unused here


def minimum_image_displacements(positions: jnp.ndarray, cell: jnp.ndarray) -> jnp.ndarray:
    """Pair displacements ``r[b, i, j] = x_j - x_i`` under the minimum image, [B, N, N, 3] Å.

    Args:
      positions: [B, N, 3] Cartesian positions in Å.
      cell: [B, 3, 3] lattice vectors as rows (Å); an all-zero cell gives plain differences.
    """
    periodic = jnp.abs(jnp.linalg.det(cell)) > 1e-6
    # a zero cell is replaced by the unit cube so that its (discarded) inverse stays finite
    safe_cell = jnp.where(periodic[:, None, None], cell, jnp.eye(3, dtype=cell.dtype))

    # imported here, not at module level: importing jax_md starts the XLA backend, and a multi-process
    # job must call jax.distributed.initialize before that (so `import bptt_mlip` must not)
    from jax_md import space

    def one_structure(pos: jnp.ndarray, lattice_rows: jnp.ndarray) -> jnp.ndarray:
        # jax-md's box maps fractional to Cartesian coordinates as columns: x = T s, T = cell^T
        displacement_fn, _ = space.periodic_general(lattice_rows.T, fractional_coordinates=False)
        return jax.vmap(lambda xi: jax.vmap(lambda xj: displacement_fn(xj, xi))(pos))(pos)

    wrapped = jax.vmap(one_structure)(positions, safe_cell)
    plain = positions[:, None, :, :] - positions[:, :, None, :]
    return jnp.where(periodic[:, None, None, None], wrapped, plain)


def cosine_envelope(distances: jnp.ndarray, cutoff: float) -> jnp.ndarray:
    """``0.5 (cos(pi d / cutoff) + 1)`` for d < cutoff, else 0: smooth (C1) at the cutoff."""
    clipped = jnp.minimum(distances, cutoff)
    return jnp.where(distances < cutoff, 0.5 * (jnp.cos(jnp.pi * clipped / cutoff) + 1.0), 0.0)


def gaussian_radial_basis(distances: jnp.ndarray, cutoff: float, num_radial: int) -> jnp.ndarray:
    """[..., K] Gaussians of d (Å) centred evenly on [0, cutoff], each as wide as the spacing."""
    centres = jnp.linspace(0.0, cutoff, num_radial, dtype=distances.dtype)
    width = cutoff / max(num_radial - 1, 1)
    return jnp.exp(-0.5 * ((distances[..., None] - centres) / width) ** 2)


def pair_geometry(displacements: jnp.ndarray, mask: jnp.ndarray, cutoff: float):
    """Distances [B, N, N] (Å, safe norm), ``within`` [B, N, N] bool (real i != j, d < cutoff),
    and the envelope [B, N, N] (zero outside ``within``)."""
    distances = losses.safe_norm(displacements)
    n = mask.shape[-1]
    pair = mask[:, :, None] & mask[:, None, :] & jnp.logical_not(jnp.eye(n, dtype=bool))
    within = pair & (distances < cutoff)
    return distances, within, jnp.where(within, cosine_envelope(distances, cutoff), 0.0)


class PairForceReadout(nn.Module):
    """``F_i = sum_j w_ij r_ij / d_ij`` with a symmetric learned weight w_ij (standardised units)."""

    hidden: int

    @nn.compact
    def __call__(self, h, basis, displacements, distances, within, envelope) -> jnp.ndarray:
        centre = nn.Dense(self.hidden, name="pair_centre")(h)
        neighbour = nn.Dense(self.hidden, use_bias=False, name="pair_neighbour")(h)
        radial = nn.Dense(self.hidden, use_bias=False, name="pair_radial")(basis)
        z = nn.silu(centre[:, :, None, :] + neighbour[:, None, :, :] + radial)
        z = nn.silu(nn.Dense(self.hidden, name="pair_hidden")(z))
        w = nn.Dense(1, name="pair_weight")(z)[..., 0]
        w = 0.5 * (w + jnp.swapaxes(w, 1, 2)) * envelope
        unit = displacements / jnp.where(within, distances, 1.0)[..., None]
        return jnp.sum(jnp.where(within[..., None], w[..., None] * unit, 0.0), axis=2)


class PeriodicAdapt(nn.Module):
    """Periodic ADAPT. Inputs: standardised descriptors [B, N, 9], mask [B, N], minimum-image
    displacements [B, N, N, 3] (Å). Output: standardised forces [B, N, 3], summing to zero."""

    config: AdaptConfig

    @nn.compact
    def __call__(self, inputs, mask, displacements, deterministic: bool = True) -> jnp.ndarray:
        cfg = self.config
        dt = MATMUL_DTYPES[cfg.matmul_dtype]
        ln_dtype = None if dt is None else jnp.float32
        distances, within, envelope = pair_geometry(displacements, mask, cfg.cutoff)
        basis = gaussian_radial_basis(distances, cfg.cutoff, cfg.num_radial) * envelope[..., None]
        density = jnp.log1p(jnp.sum(basis, axis=2))
        x = jnp.concatenate([inputs, density], axis=-1)
        x = nn.relu(nn.Dense(cfg.embed_hidden, dtype=dt, name="embed_0")(x))
        x = nn.relu(nn.Dense(cfg.d_model, dtype=dt, name="embed_1")(x))
        x = nn.Dense(cfg.d_model, dtype=dt, name="embed_2")(x)
        x = nn.Dropout(cfg.dropout)(nn.LayerNorm(dtype=ln_dtype, name="embed_norm")(x), deterministic=deterministic)
        attn_mask = key_padding_mask(mask)
        for i in range(cfg.num_layers):
            # no bias term: pairs beyond the cutoff (basis 0) and i == j get logit bias exactly 0
            bias = nn.Dense(cfg.num_heads, use_bias=False, name=f"pair_bias_{i}")(basis)
            x = EncoderBlock(cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.dropout, dtype=dt, name=f"block_{i}")(
                x, attn_mask, deterministic, attn_bias=jnp.transpose(bias, (0, 3, 1, 2))
            )
        x = nn.LayerNorm(dtype=ln_dtype, name="final_norm")(x)
        return PairForceReadout(cfg.pair_hidden, name="force_readout")(
            x, basis, displacements, distances, within, envelope
        )


def descriptor_inputs(structures: Structures, normalizer: Normalizer) -> jnp.ndarray:
    """Standardised element descriptors [B, N, 9] (the Normalizer's columns after x, y, z); 0 on padding."""
    k = NUM_COORDINATES
    x = (structures.features - normalizer.input_mean[k:]) / normalizer.input_scale()[k:]
    return jnp.where(structures.mask[..., None], x, 0.0)


def isotropic_force_scale(normalizer: Normalizer) -> jnp.ndarray:
    """Scalar eV/Å per standardised unit: the Normalizer's scale of the RMS per-component force spread."""
    return normalizer.scale(jnp.sqrt(jnp.mean(normalizer.force_std**2)))


def init_periodic_params(config: AdaptConfig, key: jax.Array, max_atoms: int = 8) -> Params:
    """Random periodic ADAPT parameters (Flax default initialisers)."""
    inputs = jnp.zeros((1, max_atoms, config.num_inputs), jnp.float32)
    displacements = jnp.zeros((1, max_atoms, max_atoms, 3), jnp.float32)
    return PeriodicAdapt(config).init(key, inputs, jnp.ones((1, max_atoms), bool), displacements)["params"]


def periodic_forces(
    params: Params,
    structures: Structures,
    config: AdaptConfig,
    normalizer: Normalizer,
    *,
    deterministic: bool = True,
    dropout_key: jax.Array | None = None,
) -> jnp.ndarray:
    """Periodic ADAPT forces in eV/Å, [B, N, 3]; exactly zero on padded atoms."""
    displacements = minimum_image_displacements(structures.positions, structures.cell)
    rngs = None if deterministic else {"dropout": dropout_key}
    out = PeriodicAdapt(config).apply(
        {"params": params}, descriptor_inputs(structures, normalizer), structures.mask, displacements,
        deterministic, rngs=rngs,
    )
    return jnp.where(structures.mask[..., None], out * isotropic_force_scale(normalizer), 0.0)


def cutoff_limit(cell: np.ndarray) -> float:
    """Largest cutoff (Å) for which the minimum image is exact: half the smallest perpendicular
    width of the cell [3, 3] (rows = lattice vectors, Å); ``inf`` for a zero (non-periodic) cell."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    if volume < 1e-6:
        return float("inf")
    areas = [np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return 0.5 * volume / max(areas)
