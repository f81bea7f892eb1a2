"""Rigid-motion augmentation of whole relaxations (a regulariser of BPTT fine-tuning).

ADAPT reads raw Cartesian coordinates and predicts forces directly, so nothing in its
architecture makes it rotation-equivariant or translation-invariant. Relaxations do not care
how a structure is placed in space: a rigid motion ``x -> R x + t`` of the start structure
moves the reference relaxed structure, its forces (``F -> R F``) and its lattice
(``cell -> cell R^T``, rows are lattice vectors) the same way. Applying one random rigid motion
per structure to everything a training example holds teaches the model that symmetry.

All functions are pure and jit-able; randomness only through the explicit ``key``. Padded atoms
keep position 0 and force 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_mlip.structures import ForceBatch, RelaxationBatch, Structures


def random_rotations(key: jax.Array, num: int, dtype=jnp.float32) -> jnp.ndarray:
    """[num, 3, 3] rotation matrices drawn uniformly from SO(3) (Haar measure).

    A unit quaternion with a standard-normal 4-vector direction is uniform on the 3-sphere,
    hence its rotation is Haar-uniform; ``det = +1`` by construction (no reflections).
    """
    q = jax.random.normal(key, (num, 4), dtype)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return jnp.stack(
        [
            jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def rigid_motions(
    key: jax.Array, batch_size: int, *, rotate: bool, max_translation: float, dtype=jnp.float32
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per structure a rotation [B, 3, 3] (identity if not ``rotate``) and a translation [B, 3]
    in Å, each component uniform in ``[-max_translation, max_translation]``."""
    k_rot, k_shift = jax.random.split(key)
    identity = jnp.broadcast_to(jnp.eye(3, dtype=dtype), (batch_size, 3, 3))
    rot = random_rotations(k_rot, batch_size, dtype) if rotate else identity
    shift = (
        jax.random.uniform(k_shift, (batch_size, 3), dtype, -max_translation, max_translation)
        if max_translation
        else jnp.zeros((batch_size, 3), dtype)
    )
    return rot, shift


def _move_points(x: jnp.ndarray, rot: jnp.ndarray, shift: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B, N, 3] points -> R x + t on real atoms, 0 on padding."""
    moved = jnp.einsum("bij,bnj->bni", rot, x) + shift[:, None, :]
    return jnp.where(mask[..., None], moved, 0.0)


def _move_structures(s: Structures, rot: jnp.ndarray, shift: jnp.ndarray) -> Structures:
    # rows of the cell are lattice vectors: a_k -> R a_k, i.e. cell -> cell @ R^T
    cell = jnp.einsum("bkj,bij->bki", s.cell, rot)
    return s.replace(positions=_move_points(s.positions, rot, shift, s.mask), cell=cell)


def augment_relaxation_batch(
    batch: RelaxationBatch, key: jax.Array, *, rotate: bool = True, max_translation: float = 0.0
) -> RelaxationBatch:
    """Apply one random rigid motion per structure to its start positions, cell and reference
    relaxed positions. Dq is unchanged for any force field that is rotation-equivariant and
    translation-invariant; ADAPT is neither, which is what this teaches."""
    rot, shift = rigid_motions(key, batch.initial.batch_size, rotate=rotate, max_translation=max_translation,
                               dtype=batch.initial.positions.dtype)
    return batch.replace(
        initial=_move_structures(batch.initial, rot, shift),
        target_positions=_move_points(batch.target_positions, rot, shift, batch.initial.mask),
    )


def augment_force_batch(
    batch: ForceBatch, key: jax.Array, *, rotate: bool = True, max_translation: float = 0.0
) -> ForceBatch:
    """Apply one random rigid motion per frame to its positions and cell, and the rotation to
    its reference forces (eV/Å)."""
    s = batch.structures
    rot, shift = rigid_motions(key, s.batch_size, rotate=rotate, max_translation=max_translation,
                               dtype=s.positions.dtype)
    zero = jnp.zeros_like(shift)
    forces = _move_points(batch.forces, rot, zero, s.mask)
    return batch.replace(structures=_move_structures(s, rot, shift), forces=forces)
