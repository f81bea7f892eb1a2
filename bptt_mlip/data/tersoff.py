"""Multi-element Tersoff energy (Si, C and their mixture) in JAX, in the LAMMPS triplet convention.

Parameters are Tersoff, PRB 39, 5566 (1989) with the erratum PRB 41, 3248 (1990). Energies in
eV, distances in Å. Used by :class:`bptt_mlip.data.oracles.TersoffMulti`.
"""

from __future__ import annotations

import numpy as np

from bptt_mlip import descriptors

# Tersoff, PRB 39, 5566 (1989) and erratum PRB 41, 3248 (1990): silicon, carbon and their mixture,
# written per (i, j, k) triplet in the LAMMPS convention. Columns: m gamma lambda3 c d h n beta
# lambda2 B R D lambda1 A. (i, j, j) rows give the pair terms of bond ij; (i, j, k) rows give the
# angular term of k on bond ij (only m, gamma, lambda3, c, d, h, R, D are read from those).
TERSOFF_COLUMNS = ("m", "gamma", "lam3", "c", "d", "h", "n", "beta", "lam2", "B", "R", "D", "lam1", "A")
TERSOFF_SIC_1989 = {
    ("C", "C", "C"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.72751, 1.5724e-7, 2.2119, 346.7, 1.95, 0.15, 3.4879, 1393.6),
    ("Si", "Si", "Si"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.78734, 1.1e-6, 1.73222, 471.18, 2.85, 0.15, 2.4799, 1830.8),
    ("Si", "Si", "C"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.0, 0.0, 0.0, 0.0, 2.36, 0.15, 0.0, 0.0),
    ("Si", "C", "C"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.78734, 1.1e-6, 1.97205, 395.126, 2.36, 0.15, 2.9839, 1597.3111),
    ("C", "Si", "Si"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.72751, 1.5724e-7, 1.97205, 395.126, 2.36, 0.15, 2.9839, 1597.3111),
    ("C", "Si", "C"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.0, 0.0, 0.0, 0.0, 1.95, 0.15, 0.0, 0.0),
    ("C", "C", "Si"): (3.0, 1.0, 0.0, 38049.0, 4.3484, -0.57058, 0.0, 0.0, 0.0, 0.0, 2.36, 0.15, 0.0, 0.0),
    ("Si", "C", "Si"): (3.0, 1.0, 0.0, 100390.0, 16.217, -0.59825, 0.0, 0.0, 0.0, 0.0, 2.85, 0.15, 0.0, 0.0),
}


def tersoff_tables(params: dict) -> tuple[tuple[int, ...], dict]:
    """(element Z tuple, {column: [E, E, E] float64 table}) from a triplet-keyed parameter dict."""
    symbols = sorted({e for key in params for e in key})
    z = tuple(int(v) for v in descriptors.atomic_numbers(symbols))
    index = {s: i for i, s in enumerate(symbols)}
    e = len(symbols)
    tables = {c: np.zeros((e, e, e)) for c in TERSOFF_COLUMNS}
    for (a, b, c_), row in params.items():
        for name, value in zip(TERSOFF_COLUMNS, row):
            tables[name][index[a], index[b], index[c_]] = value
    missing = [(a, b, c) for a in symbols for b in symbols for c in symbols if (a, b, c) not in params]
    if missing:
        raise ValueError(f"Tersoff parameters missing for triplets {missing}")
    return z, tables


def tersoff_energy_fn(displacement, tables: dict):
    """Multi-element Tersoff energy ``E(R [n, 3], type_index [n] int) -> eV`` (LAMMPS convention).

    ``type_index`` indexes the element axis of ``tables``; it is a traced argument, so one
    compilation serves every arrangement of species with the same atom count.

    E = 1/2 sum_{i != j} fc(r_ij) [A e^{-lam1 r_ij} - b_ij B e^{-lam2 r_ij}],
    b_ij = (1 + (beta zeta_ij)^n)^(-1/2n),
    zeta_ij = sum_{k != i, j} fc(r_ik) g_ijk(theta_ijk) exp((lam3 (r_ij - r_ik))^m).
    Dense over all triplets (fine for ~100 atoms); minimum image, so cell widths must exceed
    twice the largest cutoff. Safe at r = 0 and zeta = 0 (finite gradients).
    """
    import jax.numpy as jnp
    from jax_md import space

    tables = {k: jnp.asarray(v) for k, v in tables.items()}

    def fc(r, R, D):
        mid = 0.5 * (1.0 - jnp.sin(jnp.pi * (r - R) / (2.0 * D)))
        return jnp.where(r < R - D, 1.0, jnp.where(r > R + D, 0.0, mid))

    def energy(R, t):
        n = R.shape[0]
        pair = {k: v[t[:, None], t[None, :], t[None, :]] for k, v in tables.items()}  # [n, n]
        trip = {k: v[t[:, None, None], t[None, :, None], t[None, None, :]] for k, v in tables.items()}  # [n, n, n]
        eye = jnp.eye(n, dtype=bool)
        not_jk = ~(eye[None, :, :] | eye[:, :, None] | eye[:, None, :])  # k != j, k != i, j != i
        dR = space.map_product(displacement)(R, R)  # [n, n, 3]
        dR = jnp.where(eye[:, :, None], 1.0, dR)  # keep norms off zero for the gradient
        r = jnp.sqrt(jnp.sum(dR * dR, axis=-1))
        fc_ij = jnp.where(eye, 0.0, fc(r, pair["R"], pair["D"]))
        fc_ik = fc(r[:, None, :], trip["R"], trip["D"])  # [i, j, k] uses r_ik
        cos = jnp.einsum("ijx,ikx->ijk", dR, dR) / (r[:, :, None] * r[:, None, :])
        c2, d2 = trip["c"] ** 2, trip["d"] ** 2
        g = trip["gamma"] * (1.0 + c2 / d2 - c2 / (d2 + (trip["h"] - cos) ** 2))
        arg = trip["lam3"] * (r[:, :, None] - r[:, None, :])
        arg = jnp.where(trip["m"] == 3.0, arg * arg * arg, arg)
        zeta = jnp.sum(jnp.where(not_jk, fc_ik * g * jnp.exp(arg), 0.0), axis=-1)  # [i, j]
        pos = zeta > 1e-12
        bz = pair["beta"] * jnp.where(pos, zeta, 1.0)
        nn = jnp.where(pair["n"] > 0, pair["n"], 1.0)
        b = jnp.where(pos & (pair["beta"] > 0), (1.0 + jnp.exp(nn * jnp.log(bz))) ** (-0.5 / nn), 1.0)
        rep = pair["A"] * jnp.exp(-pair["lam1"] * r)
        att = pair["B"] * jnp.exp(-pair["lam2"] * r)
        return 0.5 * jnp.sum(fc_ij * (rep - b * att))

    return energy
