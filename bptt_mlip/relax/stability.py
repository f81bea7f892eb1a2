"""Is a fixed step stable for a model? The stiffest mode of the force Jacobian, by power iteration.

Near a structure X the frame ``X + eta F(X)`` acts on a small displacement d as ``d + eta J d`` with
``J = dF/dX``. For a conservative model ``J = -H`` (H the Hessian of the energy, symmetric): along an
eigenvector of H with curvature ``k > 0`` one frame multiplies the displacement by ``1 - eta k``. The
frame map, and its Jacobian product in backpropagation through time, shrink that mode while
``eta k < 2`` and grow it without bound when ``eta k > 2``; a relaxation can still end (other modes
stop moving first, or the structure leaves the stiff region) while the gradient through its frames
multiplies ``|1 - eta k| > 1`` once per frame. :func:`stiffest_curvature` estimates the largest
``|k|`` per structure; ``eta * k`` is the number to compare with 2.

For a direct-force model J need not be symmetric; the power iteration then estimates the largest
growth ``|J d| / |d|`` of a displacement after a few products, an estimate of J's spectral radius
(exact for a symmetric J once converged). Padded atoms are held at zero throughout.

Units: positions Å, forces eV/Å, curvatures eV/Å^2, step sizes Å^2/eV (so ``eta * k`` is a number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params

UNSTABLE_STEP_TIMES_CURVATURE = 2.0
"""``eta * k`` above which one frame grows a displacement along a mode of curvature k."""


def _masked_unit(vectors: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B, N, 3] vectors with padded atoms zeroed, each structure scaled to unit norm."""
    vectors = jnp.where(mask[..., None], vectors, 0.0)
    norm = jnp.sqrt(jnp.sum(vectors**2, axis=(1, 2), keepdims=True))
    return vectors / jnp.maximum(norm, 1e-30)


def stiffest_curvature(force_fn: ForceFn, model_params: Params, structures: Structures, *, iterations: int = 50,
                       key: jax.Array | None = None) -> jnp.ndarray:
    """Largest curvature magnitude (eV/Å^2) of the model's forces around each structure's positions.

    Power iteration with Jacobian-vector products of ``force_fn`` in the positions (one JVP per
    iteration for the whole batch: structures do not interact, so the batch's Jacobian is block
    diagonal and each block is iterated with its own normalisation).

    Args:
      force_fn: ``force_fn(model_params, structures) -> [B, N, 3]`` forces in eV/Å.
      model_params: the model's parameters.
      structures: [B, N] padded batch; the Jacobian is taken at ``structures.positions``.
      iterations: power-iteration steps (the estimate rises toward the largest |eigenvalue|; a gap
        between the two largest of 10x needs a handful, a near-degenerate top needs more).
      key: PRNG key of the random start vector (default: key 0).

    Returns:
      [B] float32: ``|J v| / |v|`` after the last iteration, 0 for a structure with no real atom.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    mask = structures.mask

    def jacobian_times(direction):
        def forces_at(positions):
            return force_fn(model_params, structures.replace(positions=positions))
        _, tangent = jax.jvp(forces_at, (structures.positions,), (direction,))
        return jnp.where(mask[..., None], tangent, 0.0)

    def power_step(direction, _):
        return _masked_unit(jacobian_times(direction), mask), None

    start = _masked_unit(jax.random.normal(key, structures.positions.shape, structures.positions.dtype), mask)
    direction, _ = jax.lax.scan(power_step, start, None, length=iterations)
    return jnp.sqrt(jnp.sum(jacobian_times(direction) ** 2, axis=(1, 2)))


def step_times_curvature(step_size, curvature) -> jnp.ndarray:
    """``eta * k`` (dimensionless): above :data:`UNSTABLE_STEP_TIMES_CURVATURE` the fixed-step frame map
    grows displacements along the stiffest mode instead of shrinking them."""
    return jnp.asarray(step_size) * jnp.asarray(curvature)
