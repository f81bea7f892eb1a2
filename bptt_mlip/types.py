"""Type aliases shared by every room. One name, one meaning:

* ``Params``: a pytree of arrays (Flax parameters, step-rule parameters, optimiser state).
* ``ForceFn``: any force model, ``force_fn(model_params, structures) -> [B, N, 3]`` eV/Å,
  zero on padded atoms.
* ``TrainForceFn``: a force model while training, which may use randomness (dropout):
  ``force_fn(model_params, structures, key) -> [B, N, 3]`` eV/Å.
* ``PositionForceFn``: forces of one fixed batch as a function of its positions only,
  ``fn(positions [B, N, 3] Å) -> [B, N, 3]`` eV/Å (what FIRE iterates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # structures imports nothing from here; the alias needs the name only
    from bptt_mlip.structures import Structures

Params = Any
ForceFn = Callable[[Params, "Structures"], jnp.ndarray]
TrainForceFn = Callable[[Params, "Structures", jax.Array], jnp.ndarray]
PositionForceFn = Callable[[jnp.ndarray], jnp.ndarray]
