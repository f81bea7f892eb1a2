"""Physical constraints that wrap any direct-force model.

A direct-force model (ADAPT, a user's network) predicts forces without an energy, so nothing
makes them sum to zero. A net force on a structure is unphysical and makes FIRE, which keeps
accelerating along any persistent force, drift the whole structure away from its minimum.
The wrappers here work on any ``force_fn(params, structures, *extra)`` (a
:data:`bptt_mlip.types.ForceFn` or a training ``TrainForceFn`` with its key) and keep padded
atoms exactly zero.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp

from bptt_mlip.structures import Structures


def remove_net_force(forces: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Subtract each structure's mean force over its real atoms; padded atoms become exactly 0.

    Args:
      forces: [B, N, 3] eV/Å.
      mask: [B, N] bool, True for a real atom.

    Returns:
      [B, N, 3] eV/Å whose sum over the real atoms of every structure is zero. A structure with
      no real atom (a padded batch row) stays all zero.
    """
    real = mask[..., None]
    num_real = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(forces.dtype)[:, None, None]
    mean = jnp.sum(jnp.where(real, forces, 0.0), axis=-2, keepdims=True) / num_real
    return jnp.where(real, forces - mean, 0.0)


def zero_net_force(force_fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
    """Wrap ``force_fn(params, structures, *extra, **kw) -> [B, N, 3]`` so its forces sum to zero.

    Works for inference force functions ``(params, structures)`` and training ones
    ``(params, structures, key)`` alike: extra arguments are passed through unchanged.
    """

    @functools.wraps(force_fn)
    def projected(params: Any, structures: Structures, *extra: Any, **kwargs: Any) -> jnp.ndarray:
        return remove_net_force(force_fn(params, structures, *extra, **kwargs), structures.mask)

    return projected
