"""Small learnable force fields that are not ADAPT, written as energies whose negative
gradient gives forces. They show how any force model plugs into the rollout and BPTT
(``force_fn(params, structures) -> forces``), and serve as cheap, exactly differentiable
models in tests.

Units: distances Å, energies eV, forces eV/Å.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from bptt_mlip.structures import Structures
from bptt_mlip.types import Params


def init_morse_params(depth: float = 0.5, r0: float = 2.35, alpha: float = 1.5) -> Params:
    """Morse pair parameters: well depth D (eV), equilibrium distance r0 (Å), stiffness a (1/Å)."""
    return {"depth": jnp.asarray(depth), "r0": jnp.asarray(r0), "alpha": jnp.asarray(alpha)}


def morse_energy(params: Params, positions: jnp.ndarray, mask: jnp.ndarray, cutoff: float = 6.0) -> jnp.ndarray:
    """[B] Morse pair energy ``sum_{i<j} D[(1 - exp(-a(r - r0)))^2 - 1]`` of non-periodic clusters.

    Pairs involving padded atoms, self-pairs and pairs beyond ``cutoff`` (smoothly switched off
    over the last Å) contribute exactly zero, with finite gradients.
    """
    diff = positions[:, :, None, :] - positions[:, None, :, :]
    n = positions.shape[1]
    pair = mask[:, :, None] & mask[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    r2 = jnp.sum(diff * diff, axis=-1)
    r = jnp.sqrt(jnp.where(pair, r2, 1.0))  # safe: never sqrt(0) on masked pairs
    e = params["depth"] * ((1.0 - jnp.exp(-params["alpha"] * (r - params["r0"]))) ** 2 - 1.0)
    x = jnp.clip((cutoff - r) / 1.0, 0.0, 1.0)
    switch = x * x * (3.0 - 2.0 * x)
    return 0.5 * jnp.sum(jnp.where(pair, e * switch, 0.0), axis=(-1, -2))


def morse_force_fn(params: Params, structures: Structures) -> jnp.ndarray:
    """Forces [B, N, 3] = -dE/dX of :func:`morse_energy`; zero on padded atoms."""
    grad = jax.grad(lambda x: jnp.sum(morse_energy(params, x, structures.mask)))(structures.positions)
    return jnp.where(structures.mask[..., None], -grad, 0.0)
