"""Slow, independent reference for `metrics.analyze_layer`: eigenvalues of the full (N_l+N_r)^2 bipartite
adjacency, as the spec (and the ICLR'23 / NeurIPS'23 code) computes them, with no shared code.

Used by the tests (method="dense": numpy eigvalsh of the dense adjacency; method="eigsh": scipy eigsh(k=3,
which="LM") on the sparse adjacency) and by benchmarks/spectral.py as the baseline to beat. It follows the
original layout: the flattened weight is transposed to [in, out] so that rows are left nodes.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

# (min mean left degree, min mean right degree, right strictly greater, min group size, Cheeger factor)
_RULES = {"neurips23": (3, 1, True, 2, True), "iclr23": (3, 3, False, 3, False)}
COMPARED_KEYS = ("mu0", "mu_hat", "bound_r", "delta_r", "delta_r_norm", "bound_s", "delta_s", "delta_s_norm",
                 "narc", "mu0_w", "mu_hat_w", "lambda", "delta_r_imdb", "delta_r_imdb_norm", "delta_s_imdb",
                 "delta_s_imdb_norm", "lambda_imsg", "full_spectrum")


def _ok(rules: tuple, d_l: float, d_r: float) -> bool:
    min_l, min_r, strict, _, _ = rules
    return d_l >= min_l and (d_r > min_r if strict else d_r >= min_r)


def _graph(x: np.ndarray, w: np.ndarray | None) -> tuple[sp.csr_array, np.ndarray, int, int]:
    """Adjacency of the bipartite graph of x [left, right] (zero-degree nodes removed), its node degrees
    (from the edge pattern), and the left / right node counts."""
    keep_l = x.sum(axis=1) > 0
    keep_r = x.sum(axis=0) > 0
    xk = x[keep_l][:, keep_r]
    vals = xk.astype(np.float64) if w is None else np.abs(w[keep_l][:, keep_r]).astype(np.float64) * xk
    n_l, n_r = xk.shape
    blk = sp.csr_array(vals)
    adj = sp.block_array([[None, blk], [blk.T, None]], format="csr")
    pattern = sp.block_array([[None, sp.csr_array(xk)], [sp.csr_array(xk).T, None]], format="csr")
    degree = np.asarray(pattern.sum(axis=1)).ravel()
    return adj, degree, n_l, n_r


def _top3_abs(adj: sp.csr_array, method: str, tol: float) -> list[float]:
    n = adj.shape[0]
    if method == "dense" or n <= 64:
        vals = np.linalg.eigvalsh(adj.toarray())
    else:
        vals = eigsh(adj, k=3, which="LM", return_eigenvectors=False, tol=tol)
    vals = sorted((abs(v) for v in vals), reverse=True) + [0.0, 0.0, 0.0]
    return vals[:3]


def _scores(x: np.ndarray, w: np.ndarray | None, rules: tuple, method: str, tol: float) -> dict | None:
    adj, degree, n_l, n_r = _graph(x, None)
    d_l, d_r = degree[:n_l].mean(), degree[n_l:].mean()
    if not _ok(rules, d_l, d_r):
        return None
    eig = _top3_abs(adj, method, tol)
    mu0, mu_hat = eig[0], eig[2]
    ub_r = math.sqrt(d_l - 1) + math.sqrt(d_r - 1)
    out = {"mu0": mu0, "mu_hat": mu_hat, "d_left": d_l, "d_right": d_r, "n_left": n_l, "n_right": n_r,
           "edges": int(degree[:n_l].sum()), "bound_r": ub_r, "delta_r": ub_r - mu_hat,
           "delta_r_norm": (ub_r - mu_hat) / ub_r}
    if mu0 < 1:
        out.update(bound_s=None, delta_s=-1.0, delta_s_norm=None)
    else:
        ub_s = 2 * math.sqrt(mu0 - 1)
        out.update(bound_s=ub_s, delta_s=ub_s - mu_hat, delta_s_norm=(ub_s - mu_hat) / ub_s if ub_s > 0 else None)
    if w is not None:
        wadj, _, _, _ = _graph(x, w)
        weig = _top3_abs(wadj, method, tol)
        out.update(mu0_w=weig[0], mu_hat_w=weig[2], **{"lambda": weig[0] - weig[2]})
    return out


def reference_layer(mask: np.ndarray, weight: np.ndarray | None = None, *, iterative: bool = True,
                    convention: str = "neurips23", method: str = "dense", tol: float = 0.0) -> dict:
    """Same keys as metrics.analyze_layer for the numbers both define (None where undefined)."""
    rules = _RULES[convention]
    mask = np.asarray(mask)
    out_dim = mask.shape[0]
    x = (mask.reshape(out_dim, -1) != 0).T  # [in (left), out (right)]
    w = None if weight is None else np.asarray(weight, dtype=np.float64).reshape(out_dim, -1).T
    in_dim = x.shape[0]
    rec: dict = dict.fromkeys(COMPARED_KEYS)
    if x.sum() == 0:
        rec["status"] = "skipped"
        return rec
    full = _scores(x, w, rules, method, tol)
    if full is None:
        rec["status"] = "skipped"
        return rec
    rec["status"] = "ok"
    rec.update(full)
    n_l, n_r, edges = full["n_left"], full["n_right"], full["edges"]
    # ICLR'23 random_bound(eig_second, total_edges=edge_index.size(1), ...): PyG stores each undirected edge
    # twice, so total_edges is 2E
    rec["narc"] = ((full["mu_hat"] ** 2 / 4 + 1) * math.sqrt(n_l * n_r)
                   - abs(2 * edges - (full["d_left"] / out_dim) * n_l * n_r)) / (in_dim * out_dim)
    if not iterative:
        return rec

    left_degree = x.sum(axis=1)
    per = collections.defaultdict(list)
    for degree, count in collections.Counter(left_degree.tolist()).items():
        if degree == 0 or count < rules[3]:
            continue
        rows = left_degree == degree
        sub = _scores(x[rows], None if w is None else w[rows], rules, method, tol)
        if sub is None:
            continue
        n_in, n_out = sub["n_left"], sub["n_right"]
        factor = max(n_in, n_out) / (n_in + n_out - 1) if rules[4] else 1.0
        for k_sub, k in (("delta_r", "delta_r_imdb"), ("delta_r_norm", "delta_r_imdb_norm"),
                         ("delta_s", "delta_s_imdb"), ("delta_s_norm", "delta_s_imdb_norm"),
                         ("lambda", "lambda_imsg")):
            if sub.get(k_sub) is not None:
                per[k].append(factor * sub[k_sub])
    for k, vals in per.items():
        rec[k] = sum(vals) / len(vals)
    terms = [rec["delta_r"], rec["lambda"], rec["delta_r_imdb"], rec["lambda_imsg"]]
    rec["full_spectrum"] = float(np.linalg.norm([t if t is not None else 0.0 for t in terms]))
    return rec
