"""Force calls on the rows still running: a batch that shrinks as its structures stop.

A rollout's batch of B structures runs until its slowest member stops, and every frame evaluates
the force model on all B rows although the rows that stopped are frozen. :func:`running_row_forces`
gathers the rows still running into the smallest sub-batch of ``B, B/2, B/4, ...`` rows (at most
``levels`` halvings) that holds them, calls the model on that sub-batch only and scatters the forces
back. The choice is a ``lax.switch`` on the running count, so each frame pays for its sub-batch,
forward and, inside a differentiated scan, backward (a switch's backward pass runs only the branch
its forward pass took). Each branch is compiled on its own: ``levels + 1`` copies of the model.

It needs a force model whose rows are independent (a row's forces depend on that row's structure
only), which every model of this library is. Rows not running get zero forces, so their step must
not be taken (the rollout freezes them). A branch computes each row on a sub-batch of another shape,
so forces agree with the full batch's to float32 rounding, not bit for bit. Under ``vmap`` a switch
becomes a select that runs every branch: callers that vmap a rollout (the grid search) keep it off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_mlip.structures import Structures
from bptt_mlip.types import ForceFn, Params


def sub_batch_sizes(batch_size: int, levels: int) -> tuple[int, ...]:
    """The row counts a batch of ``batch_size`` rows may shrink to, smallest first, ending with
    ``batch_size``: ``ceil(B / 2^j)`` for ``j = levels, ..., 0``, repeats removed."""
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    sizes = {-(-batch_size // (1 << j)) for j in range(levels + 1)}
    return tuple(sorted(sizes))


def running_row_forces(force_fn: ForceFn, model_params: Params, structures: Structures, running: jnp.ndarray,
                       levels: int) -> jnp.ndarray:
    """Forces [B, N, 3] (eV/Å) of the ``running`` [B] bool rows of ``structures``, zero on the other rows.

    The running rows (in row order) are gathered into the smallest of :func:`sub_batch_sizes` that
    holds them; the sub-batch is filled up with rows that are not running, whose forces are dropped.
    ``levels`` = 0 calls the model on the whole batch (then zeroes the rows not running)."""
    b = structures.batch_size
    sizes = sub_batch_sizes(b, levels)
    running = jnp.asarray(running, bool)
    zero = jnp.zeros((), structures.positions.dtype)
    if len(sizes) == 1:
        return jnp.where(running[:, None, None], force_fn(model_params, structures), zero)
    # running rows first, each group in row order: the first `size` rows hold every running row
    order = jnp.argsort(jnp.logical_not(running), stable=True)

    def on_rows(size: int):
        def call(model_params, structures, running, order):
            if size == b:
                return jnp.where(running[:, None, None], force_fn(model_params, structures), zero)
            rows = order[:size]
            sub = jax.tree.map(lambda a: a[rows], structures)
            forces = jnp.where(running[rows][:, None, None], force_fn(model_params, sub), zero)
            return jnp.zeros(structures.positions.shape, forces.dtype).at[rows].set(forces)

        return call

    count = jnp.sum(running.astype(jnp.int32))
    branch = sum((count > s).astype(jnp.int32) for s in sizes[:-1])  # the first size that holds `count`
    return jax.lax.switch(branch, [on_rows(s) for s in sizes], model_params, structures, running, order)
