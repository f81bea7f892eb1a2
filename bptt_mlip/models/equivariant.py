"""A conservative, rotation-equivariant message-passing potential (MACE- or NequIP-like), periodic.

Energy ``E(X) = sum_i [s * e_i(X) + shift(Z_i)]`` over the real atoms of each structure and forces
``F = -dE/dX`` (eV, eV/Å). ``e_i`` is read from the scalar channels of node features built by
``num_layers`` interaction blocks over the periodic neighbour lists of
:mod:`bptt_mlip.models.neighbours`:

* node features start as a learned embedding of the atomic number (``channels x 0e``);
* an edge ``i <- j`` carries the spherical harmonics ``Y^l(r_ij / |r_ij|)`` for l <= ``max_angular``
  and a radial basis (Bessel functions times a polynomial envelope that vanishes with its first
  two derivatives at the cutoff, so forces and their derivatives are continuous);
* ``messages="density"`` (default, MACE-like with scalar hidden features): a block builds the
  equivariant neighbour density ``A_i,clm = sum_j R_cl(r_ij) h_j,c Y_lm(r_ij)``, contracts it to
  invariants (``A_i,c00`` and the channel-mixed power spectrum ``sum_m (W_l A)_clm A_clm``,
  three-body angular terms) and updates ``h_i`` with a residual MLP;
* ``messages="tensor"`` (NequIP-like, equivariant hidden features up to ``max_angular``): a block
  sends ``m_ij = R(|r_ij|) * [h_j, h_j (x) Y(r_ij)]`` (e3nn tensor products, a weight per path),
  sums over the neighbours of i, adds a self-connection and applies a gated nonlinearity. About
  4 times slower on CPU than ``"density"`` at the same width.

Built on e3nn-jax (irreps, spherical harmonics, Bessel basis, envelope, tensor products,
equivariant Linear, gate), which jax-md already depends on; jax-md's NequIP energy was not used
because it takes one box and one unpadded neighbour list per system. Everything is twice
differentiable with finite gradients: padded atoms and unused edge slots hold safe geometry and
contribute exactly zero, so BPTT can differentiate ``-dE/dX`` with respect to the parameters.

Structures whose neighbour count overflows the edge capacity, or whose cell is too narrow for the
cutoff at ``periodic_images`` (narrower than twice the cutoff at the default 0), get NaN energies
and forces on their real atoms (the rollout then marks them diverged; a trained step size would
still see NaN in its gradient). Check on the host first with :func:`check_structures` or
:func:`neighbour_overflow`; :func:`choose_periodic_images` picks the image shifts and
:func:`choose_capacity` a capacity bucket that fit a dataset (with a margin for atoms that move
closer while relaxing).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import e3nn_jax as e3nn
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bptt_mlip import descriptors, losses
from bptt_mlip.models import neighbours
from bptt_mlip.models.adapt import Normalizer
from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params, TrainForceFn

NUM_SPECIES = descriptors.MAX_Z + 1  # embedding rows indexed by Z; row 0 is padding
MESSAGE_KINDS = ("density", "tensor")


@dataclasses.dataclass(frozen=True)
class EquivariantConfig:
    """Static hyper-parameters (hashable: usable as a jit static argument).

    Attributes:
      cutoff: neighbour cutoff in Å; must be below half the smallest width of every cell.
      channels: multiplicity of each irrep l = 0..max_angular in the node features.
      max_angular: largest angular order l of spherical harmonics and node features.
      num_layers: interaction blocks.
      num_radial: Bessel radial basis functions.
      radial_hidden: hidden width of the MLP that turns the radial basis into path weights.
      capacity: edge slots per atom K, one of ``neighbours.CAPACITY_BUCKETS``.
      avg_neighbours: the neighbour sum is divided by sqrt(avg_neighbours) to keep activations O(1).
      messages: ``"density"`` (MACE-like, scalar hidden features) or ``"tensor"`` (NequIP-like,
        equivariant hidden features); see the module docstring.
      periodic_images: lattice translations per cell axis searched for neighbours (see
        :mod:`bptt_mlip.models.neighbours`): 0 takes each pair at its minimum image, exact for
        cells wider than twice the cutoff; m allows cells wider than ``cutoff / (m + 1/2)`` at
        ``(2m + 1)^3`` times the pair work. ``fit_config`` chooses it from the training data.
    """

    cutoff: float = 5.0
    channels: int = 16
    max_angular: int = 2
    num_layers: int = 2
    num_radial: int = 8
    radial_hidden: int = 32
    capacity: int = 48
    avg_neighbours: float = 28.0
    messages: str = "density"
    periodic_images: int = 0

    def __post_init__(self):
        if self.messages not in MESSAGE_KINDS:
            raise ValueError(f"messages must be one of {MESSAGE_KINDS}, got {self.messages!r}")
        if self.capacity not in neighbours.CAPACITY_BUCKETS:
            raise ValueError(f"capacity must be one of {neighbours.CAPACITY_BUCKETS}, got {self.capacity}")
        if (self.cutoff <= 0 or self.channels < 1 or self.max_angular < 0 or self.num_layers < 1
                or self.num_radial < 1 or self.periodic_images < 0):
            raise ValueError(f"invalid EquivariantConfig values: {self}")

    @property
    def hidden_irreps(self) -> e3nn.Irreps:
        """``channels x`` each irrep of natural parity (0e + 1o + 2e + ...)."""
        return e3nn.Irreps([(self.channels, (l, (-1) ** l)) for l in range(self.max_angular + 1)])


SMALL_EQUIVARIANT = EquivariantConfig()
TINY_EQUIVARIANT = EquivariantConfig(cutoff=3.0, channels=4, max_angular=1, num_layers=1, num_radial=4,
                                     radial_hidden=8, capacity=16, avg_neighbours=8.0)


@flax.struct.dataclass
class EnergyScale:
    """Per-atom energy offsets and the scale of the network's output.

    Attributes:
      element_shift: [NUM_SPECIES] eV added per atom of each element (least-squares fit of total
        energies on element counts; zeros when unknown).
      energy_scale: scalar eV multiplying the network's per-atom output (about the force RMS
        times 1 Å, so initial forces are of the data's size).
    """

    element_shift: jnp.ndarray
    energy_scale: jnp.ndarray

    @staticmethod
    def constant(scale: float = 1.0) -> "EnergyScale":
        return EnergyScale(element_shift=jnp.zeros(NUM_SPECIES, jnp.float32),
                           energy_scale=jnp.asarray(scale, jnp.float32))


ScaleLike = Union[EnergyScale, Normalizer, float]
"""What the model builders accept as their energy scale (see :func:`as_energy_scale`)."""


def as_energy_scale(normalizer_or_scale: ScaleLike) -> EnergyScale:
    """An :class:`EnergyScale` from itself, a float (eV), or ADAPT's :class:`Normalizer` (the RMS of
    its per-component force spreads, eV/Å times 1 Å; no offsets)."""
    if isinstance(normalizer_or_scale, EnergyScale):
        return normalizer_or_scale
    if isinstance(normalizer_or_scale, Normalizer):
        return EnergyScale.constant(1.0).replace(energy_scale=jnp.sqrt(jnp.mean(normalizer_or_scale.force_std ** 2)))
    return EnergyScale.constant(float(normalizer_or_scale))


def fit_energy_scale(species: np.ndarray, forces: np.ndarray, mask: np.ndarray,
                     energies: np.ndarray | None = None) -> EnergyScale:
    """Fit :class:`EnergyScale` on training frames.

    Args:
      species: [F, N] atomic numbers (0 = padding). forces: [F, N, 3] eV/Å. mask: [F, N] bool.
      energies: [F] total energies in eV, or None (then no offsets).
    Returns:
      offsets from least squares of ``energies`` on per-element atom counts, and the RMS force
      component (eV/Å, times 1 Å) as the scale (1 eV if there are no forces).
    """
    species, mask = np.asarray(species), np.asarray(mask, bool)
    f = np.asarray(forces, np.float64)[mask]
    scale = float(np.sqrt(np.mean(f * f))) if f.size else 1.0
    shift = np.zeros(NUM_SPECIES, np.float64)
    if energies is not None:
        elements = np.unique(species[mask])
        counts = np.stack([np.sum((species == z) & mask, axis=-1) for z in elements], axis=-1).astype(np.float64)
        solution, *_ = np.linalg.lstsq(counts, np.asarray(energies, np.float64), rcond=None)
        shift[elements] = solution
    return EnergyScale(element_shift=jnp.asarray(shift, jnp.float32),
                       energy_scale=jnp.asarray(max(scale, 1e-6), jnp.float32))


def _gather_neighbours(node: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """[B, N, D] node values, [B, N, K] indices -> [B, N, K, D] values of each edge's neighbour j."""
    return jax.vmap(lambda values, idx: values[idx])(node, index)


class DensityInteraction(nn.Module):
    """A MACE-like block on scalar features ``h`` [B, N, C x 0e]: equivariant neighbour density, its
    invariants (two- and three-body), a residual MLP update."""

    config: EquivariantConfig

    @nn.compact
    def __call__(self, h: e3nn.IrrepsArray, sh: e3nn.IrrepsArray, radial: jnp.ndarray, edge_weight: jnp.ndarray,
                 index: jnp.ndarray) -> e3nn.IrrepsArray:
        cfg = self.config
        c, num_l = cfg.channels, cfg.max_angular + 1
        h_j = _gather_neighbours(nn.Dense(c, name="pre_linear")(h.array), index)  # [B, N, K, C]
        hidden = nn.silu(nn.Dense(cfg.radial_hidden, name="radial_hidden")(radial))
        weights = nn.Dense(c * num_l, name="radial_out")(hidden).reshape(radial.shape[:-1] + (num_l, c))
        weights = weights * (edge_weight / jnp.sqrt(cfg.avg_neighbours))[..., None, None]  # [B, N, K, L, C]
        invariants = [h.array]
        for l in range(num_l):
            density = jnp.einsum("bnkc,bnkm->bncm", weights[..., l, :] * h_j, sh.array[..., l * l:(l + 1) ** 2])
            if l == 0:
                invariants.append(density[..., 0])
            mix = self.param(f"mix_{l}", nn.initializers.lecun_normal(), (c, c))
            invariants.append(jnp.einsum("bncm,cd,bndm->bnd", density, mix, density) / (2 * l + 1))
        update = nn.Dense(c, name="update_out")(nn.silu(nn.Dense(2 * c, name="update_in")(
            jnp.concatenate(invariants, axis=-1))))
        return e3nn.IrrepsArray(h.irreps, h.array + update)


class TensorInteraction(nn.Module):
    """A NequIP-like block: equivariant messages over edges, summed, self-connection, gate."""

    config: EquivariantConfig

    @nn.compact
    def __call__(self, h: e3nn.IrrepsArray, sh: e3nn.IrrepsArray, radial: jnp.ndarray, edge_weight: jnp.ndarray,
                 index: jnp.ndarray) -> e3nn.IrrepsArray:
        cfg = self.config
        target = cfg.hidden_irreps
        num_gates = target.filter(drop=["0e", "0o"]).num_irreps
        with_gates = (e3nn.Irreps(f"{num_gates}x0e") + target).regroup() if num_gates else target
        h_nodes = e3nn.flax.Linear(h.irreps, name="pre_linear")(h)
        h_j = e3nn.IrrepsArray(h_nodes.irreps, _gather_neighbours(h_nodes.array, index))
        products = e3nn.tensor_product(h_j, sh, filter_ir_out=target)
        messages = e3nn.concatenate([h_j.filter(keep=target), products]).regroup()
        mix = nn.silu(nn.Dense(cfg.radial_hidden, name="radial_hidden")(radial))
        mix = nn.Dense(messages.irreps.num_irreps, name="radial_out")(mix)
        messages = messages * (mix * edge_weight[..., None])
        summed = e3nn.IrrepsArray(messages.irreps, jnp.sum(messages.array, axis=2) / jnp.sqrt(cfg.avg_neighbours))
        # force_irreps_out: the first block's scalar-only input has no path to l > 0 (zeros there)
        out = e3nn.flax.Linear(with_gates, name="message_linear")(summed) + e3nn.flax.Linear(
            with_gates, force_irreps_out=True, name="self_linear")(h)
        out = e3nn.gate(out, even_act=jax.nn.silu, even_gate_act=jax.nn.sigmoid)
        return out + h if out.irreps == h.irreps else out


class EquivariantPotential(nn.Module):
    """Per-atom energies [B, N] (dimensionless, before :class:`EnergyScale`) from species and edges."""

    config: EquivariantConfig

    @nn.compact
    def __call__(self, species: jnp.ndarray, vectors: jnp.ndarray, edge_mask: jnp.ndarray,
                 index: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        lengths = losses.safe_norm(vectors)  # > 0: unused slots hold a safe vector, real atoms never coincide
        unit = vectors / lengths[..., None]
        sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(cfg.max_angular), unit, normalize=False,
                                      normalization="component")
        envelope = e3nn.poly_envelope(5, 2, cfg.cutoff)(lengths)
        edge_weight = jnp.where(edge_mask, envelope, 0.0)
        radial = e3nn.bessel(lengths, cfg.num_radial, cfg.cutoff) * jnp.sqrt(cfg.cutoff / 2.0)  # O(1) values
        # unit-variance embedding: O(1) node features, so initial forces are O(energy_scale) per Å
        embedding = nn.Embed(NUM_SPECIES, cfg.channels, embedding_init=nn.initializers.normal(1.0),
                             name="species_embedding")(species)
        h = e3nn.IrrepsArray(f"{cfg.channels}x0e", embedding)
        block = DensityInteraction if cfg.messages == "density" else TensorInteraction
        for layer in range(cfg.num_layers):
            h = block(cfg, name=f"interaction_{layer}")(h, sh, radial, edge_weight, index)
        scalars = h.filter(keep="0e").array
        hidden = nn.silu(nn.Dense(cfg.channels, name="readout_hidden")(scalars))
        return nn.Dense(1, name="readout_out")(hidden)[..., 0]


def init_params(config: EquivariantConfig, key: jax.Array, max_atoms: int = 8) -> Params:
    """Random parameters; their shapes depend on neither the atom count nor the edge capacity."""
    k = max(1, min(config.capacity, max_atoms - 1))
    species = jnp.full((1, max_atoms), 14, jnp.int32)
    vectors = jnp.ones((1, max_atoms, k, 3), jnp.float32)
    return EquivariantPotential(config).init(
        key, species, vectors, jnp.ones((1, max_atoms, k), bool), jnp.zeros((1, max_atoms, k), jnp.int32)
    )["params"]


def structure_energies(params: Params, structures: Structures, config: EquivariantConfig,
                       energy_scale: EnergyScale) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(energies [B] in eV, invalid [B] bool) where invalid = edge overflow or cell too small.

    Energies of invalid structures are computed on a truncated edge list and must not be used.
    """
    edges = neighbours.build_edges(structures.positions, structures.cell, structures.mask, config.cutoff,
                                   config.capacity, config.periodic_images)
    out = EquivariantPotential(config).apply({"params": params}, structures.species, edges.vectors, edges.mask,
                                             edges.index)
    per_atom = energy_scale.energy_scale * out + energy_scale.element_shift[structures.species]
    energies = jnp.sum(jnp.where(structures.mask, per_atom, 0.0), axis=-1)
    invalid = edges.overflow | neighbours.cell_too_small(structures.cell, config.cutoff, config.periodic_images)
    return energies, invalid


def energies_and_forces(params: Params, structures: Structures, config: EquivariantConfig,
                        energy_scale: EnergyScale) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(energies [B] eV, forces [B, N, 3] eV/Å = -dE/dX): one forward and one backward pass.

    Forces are exactly zero on padded atoms; invalid structures get NaN energy and NaN forces on
    their real atoms.
    """

    def total(positions):
        energies, invalid = structure_energies(params, structures.replace(positions=positions), config, energy_scale)
        return jnp.sum(energies), (energies, invalid)

    gradient, (energies, invalid) = jax.grad(total, has_aux=True)(structures.positions)
    forces = jnp.where(invalid[:, None, None], jnp.nan, -gradient)
    forces = jnp.where(structures.mask[..., None], forces, 0.0)
    return jnp.where(invalid, jnp.nan, energies), forces


def make_energy_fn(config: EquivariantConfig, normalizer_or_scale: ScaleLike = 1.0):
    """``energy_fn(params, structures) -> [B]`` eV (NaN for invalid structures, see the module docstring)."""
    energy_scale = as_energy_scale(normalizer_or_scale)

    def energy_fn(params: Params, structures: Structures) -> jnp.ndarray:
        energies, invalid = structure_energies(params, structures, config, energy_scale)
        return jnp.where(invalid, jnp.nan, energies)

    return energy_fn


def make_energy_force_fn(config: EquivariantConfig, normalizer_or_scale: ScaleLike = 1.0):
    """``fn(params, structures) -> (energies [B] eV, forces [B, N, 3] eV/Å)`` (for calculators)."""
    energy_scale = as_energy_scale(normalizer_or_scale)
    return lambda params, structures: energies_and_forces(params, structures, config, energy_scale)


def make_force_fn(config: EquivariantConfig, normalizer_or_scale: ScaleLike = 1.0) -> ForceFn:
    """``force_fn(params, structures) -> [B, N, 3]`` eV/Å = -dE/dX; zero on padded atoms."""
    energy_force_fn = make_energy_force_fn(config, normalizer_or_scale)
    return lambda params, structures: energy_force_fn(params, structures)[1]


def make_train_force_fn(config: EquivariantConfig, normalizer_or_scale: ScaleLike = 1.0) -> TrainForceFn:
    """Like :func:`make_force_fn` with the training signature ``(params, structures, key)``; the
    model has no dropout, so the key is unused."""
    force_fn = make_force_fn(config, normalizer_or_scale)
    return lambda params, structures, key: force_fn(params, structures)


def neighbour_overflow(config: EquivariantConfig, structures: Structures) -> jnp.ndarray:
    """[B] bool: some atom has more neighbours within the cutoff than ``config.capacity`` (jit-able)."""
    counts = neighbours.neighbour_counts(structures.positions, structures.cell, structures.mask, config.cutoff,
                                         config.periodic_images)
    return jnp.any(counts > config.capacity, axis=-1)


def max_neighbour_count(config: EquivariantConfig, structures: Structures) -> int:
    """The largest number of neighbours within the cutoff of any atom of the batch (host)."""
    counts = neighbours.neighbour_counts(structures.positions, structures.cell, structures.mask, config.cutoff,
                                         config.periodic_images)
    return int(jnp.max(counts, initial=0))


def check_structures(config: EquivariantConfig, structures: Structures, where: str = "") -> None:
    """Raise ValueError naming every structure of the batch whose cell is too narrow for the cutoff
    at ``config.periodic_images``, or whose neighbour count exceeds the capacity (host-side, before
    running)."""
    problems = neighbours.host_cell_check(np.asarray(structures.cell), config.cutoff, config.periodic_images)
    if not problems:  # neighbour counts of a cell the list cannot cover would be wrong
        counts = np.asarray(neighbours.neighbour_counts(structures.positions, structures.cell, structures.mask,
                                                        config.cutoff, config.periodic_images))
        for b in np.nonzero(counts.max(axis=-1, initial=0) > config.capacity)[0]:
            largest = int(counts[b].max())
            problems.append(f"structure {b}: an atom has {largest} neighbours within {config.cutoff} Å, more than "
                            f"the capacity {config.capacity} (use capacity={neighbours.capacity_bucket(largest)})")
    if problems:
        raise ValueError(f"equivariant model cannot run {where or 'this batch'}:\n  " + "\n  ".join(problems))


def choose_periodic_images(config: EquivariantConfig, cells) -> EquivariantConfig:
    """``config`` with the smallest ``periodic_images`` (never below the one it has) that finds every
    pair within the cutoff in each of ``cells`` (an iterable of [3, 3] lattices, rows, Å; or
    [B, 3, 3] arrays of them). The parameters do not depend on it: a trained model stays the same
    function of the positions, only its neighbour search reaches farther."""
    needed = [neighbours.images_needed(c, config.cutoff) for c in np.asarray(cells, np.float64).reshape(-1, 3, 3)]
    return dataclasses.replace(config, periodic_images=max([config.periodic_images] + needed))


def choose_capacity(config: EquivariantConfig, structures_list: list[Structures], margin: int = 4) -> EquivariantConfig:
    """``config`` with the smallest capacity bucket that holds every batch's largest neighbour count
    plus ``margin`` (room for atoms that move closer during a relaxation)."""
    largest = max((max_neighbour_count(config, s) for s in structures_list), default=0)
    return dataclasses.replace(config, capacity=neighbours.capacity_bucket(largest + margin))
