"""Ramanujan-graph metrics of sparse masks (spec section 4), from two singular values per graph.

A layer's mask [out, in] is a bipartite graph: left nodes = in units, right nodes = out units, zero-degree
nodes removed; B is its [out, in] biadjacency (0/1, or |W| on the mask for the weighted graph). The full
adjacency A = [[0, B], [B^T, 0]] has eigenvalues +-sigma_i(B) plus zeros, so the spec's top-3 |eig(A)|
are [sigma1, sigma1, sigma2]: mu0 = sigma1(B) and mu_hat = sigma2(B). Two singular values of B, by Lanczos
on the smaller Gram side (or a small dense Gram), replace the (N_l+N_r)^2 eigenproblem; `reference.py`
keeps the full-adjacency route to check these numbers against.

Per layer (None where undefined):
  delta_r   = sqrt(d_l-1) + sqrt(d_r-1) - mu_hat        (bound_r = the two square roots; delta_r_norm = /bound_r)
  delta_s   = 2 sqrt(mu0-1) - mu_hat, -1 if mu0 < 1     (bound_s, delta_s_norm likewise)
  lambda    = mu0(A_w) - mu_hat(A_w) on |W|             (needs weights)
  narc      = [(mu_hat^2/4+1) sqrt(N_l N_r) - |2E - (d_l/D_out) N_l N_r|] / (D_in D_out), <= 0: "random"
  *_imdb / lambda_imsg: the same scores on each d-left-regular subgraph (left nodes of one degree d, all
            right nodes they reach), averaged over the valid subgraphs.
  full_spectrum = ||(delta_r, lambda, delta_r_imdb, lambda_imsg)||_2, undefined terms as 0.

Choices (the papers' two codebases differ; see CONVENTIONS):
- Default convention "neurips23" (Hoang et al. NeurIPS'23, whose lambda / lambda_imsg Sparse-IFT reports):
  a graph is scored if d_l >= 3 and d_r > 1; degree groups need >= 2 nodes; each subgraph score (the
  normalised forms too) is multiplied by the Cheeger-like factor max(n_in, n_out) / (n_in + n_out - 1).
  "iclr23" (Hoang et al. ICLR'23): d_l >= 3 and d_r >= 3, groups >= 3 nodes, no factor. Under iclr23 the
  subgraphs of a wide fc1 (1536 -> 6144 at s=0.75: ~7 left nodes per degree, d_r ~ 2) all fail, so
  delta_r_imdb would be undefined for half of a GPT's MLP layers.
- The weighted graph has the mask's edges with weights |W|: validity, degrees and node removal come from
  the mask (the NeurIPS'23 code used the non-zero weights, which differs only for kept weights that are
  exactly 0, e.g. just-grown RigL connections, and only in gating, never in the spectrum).
- NaRC follows the ICLR'23 code (VITA-Group/ramanujan-on-pai `lib/graphs/scores.py`): it calls
  `random_bound(mu_hat, graph.edge_index.size(1), ...)`, and a PyG edge_index of an undirected graph holds
  each edge in both directions, so the edge term is 2E for E mask non-zeros. With no dead output units
  (d_l/D_out) N_l N_r = E, so the subtracted term is E (with E it would be 0 and every mask would score as
  "not random"). Full graph only.
- A layer whose full graph fails the degree conditions is reported as skipped (with the reason) and gets
  no metrics. Model averages are means over the layers where a metric is defined (the papers' code
  averaged with undefined = 0); the counts are reported beside them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, svds

from sift_megatron.errors import SiftError


@dataclass(frozen=True)
class Convention:
    min_left: float  # mean left degree must be >= this
    min_right: float  # mean right degree must be >= (or > when right_strict) this
    right_strict: bool
    min_group: int  # left nodes of one degree needed to form an iterative-mean subgraph
    cheeger: bool  # scale subgraph scores by max(n_in, n_out) / (n_in + n_out - 1)

    def invalid(self, d_left: float, d_right: float) -> str | None:
        """Why a graph with these mean degrees is not scored, or None."""
        if d_left < self.min_left:
            return f"mean left degree {d_left:.3g} < {self.min_left:g}"
        if (d_right <= self.min_right) if self.right_strict else (d_right < self.min_right):
            return f"mean right degree {d_right:.3g} {'<=' if self.right_strict else '<'} {self.min_right:g}"
        return None


CONVENTIONS: dict[str, Convention] = {
    "neurips23": Convention(min_left=3, min_right=1, right_strict=True, min_group=2, cheeger=True),
    "iclr23": Convention(min_left=3, min_right=3, right_strict=False, min_group=3, cheeger=False),
}

# Matrices whose smaller side is at most this go through a dense Gram + eigh (faster than Lanczos there).
DENSE_MAX = 256
# Lanczos (ARPACK) tolerance on the Gram eigenvalues sigma^2: a converged Ritz value theta is within
# tol*theta of an eigenvalue, so sigma is within 5e-7 relative even in the worst case; Ritz values converge
# quadratically, so in practice sigma matches tol=0 to ~1e-11 (measured), with 25% fewer matvecs than 1e-8.
GRAM_TOL = 1e-6

METRICS = ("mu0", "mu_hat", "delta_r", "delta_r_norm", "delta_s", "delta_s_norm", "narc", "mu0_w", "mu_hat_w",
           "lambda", "delta_r_imdb", "delta_r_imdb_norm", "delta_s_imdb", "delta_s_imdb_norm", "lambda_imsg",
           "full_spectrum")
GRAPH_FIELDS = ("out", "in", "edges", "density", "n_left", "n_right", "d_left", "d_right", "bound_r", "bound_s")


def top2_singular(m: np.ndarray | sp.sparray | sp.spmatrix, dense_max: int = DENSE_MAX,
                  seed: int = 0) -> tuple[float, float]:
    """The two largest singular values (sigma2 = 0 when rank < 2). Deterministic for a given seed."""
    rows, cols = m.shape
    if min(rows, cols) == 0:
        return 0.0, 0.0
    if min(rows, cols) > max(dense_max, 2):
        try:
            s = svds(m if sp.issparse(m) else sp.csr_array(m), k=2, tol=math.sqrt(GRAM_TOL),
                     return_singular_vectors=False, random_state=np.random.default_rng(seed))
            s = np.sort(s)[::-1]
            return float(s[0]), float(s[1])
        except ArpackNoConvergence:
            pass  # rare; the dense route below is exact, only slower
    a = m.toarray() if sp.issparse(m) else np.asarray(m)
    a = a.astype(np.float64, copy=False)
    if rows < cols:
        a = a.T  # tall: the Gram matrix is on the smaller side
    _, vecs = np.linalg.eigh(a.T @ a)
    # Rayleigh-Ritz on the top-2 eigenvectors: exact small singular values, unlike sqrt(Gram eigenvalue)
    s = np.linalg.svd(a @ vecs[:, -2:], compute_uv=False)
    return float(s[0]), float(s[1]) if s.size > 1 else 0.0


def _as_2d(name: str, mask: np.ndarray, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise SiftError(f"layer {name!r}: mask must be at least 2-D [out, in], got shape {list(mask.shape)}")
    if weight is not None:
        weight = np.asarray(weight)
        if weight.shape != mask.shape:
            raise SiftError(f"layer {name!r}: weight shape {list(weight.shape)} != mask shape {list(mask.shape)}")
    if mask.ndim > 2:  # conv [c_out, c_in, kh, kw]: every kernel tap is a left node
        mask = mask.reshape(mask.shape[0], -1)
        weight = None if weight is None else weight.reshape(weight.shape[0], -1)
    return (mask if mask.dtype == np.bool_ else mask != 0), weight


def _biadjacency(mask: np.ndarray, deg_right: np.ndarray, cols: np.ndarray, data: np.ndarray) -> sp.csr_array:
    """CSR [kept out units, kept in units] of the mask's edges; `data` in row-major edge order."""
    c = np.flatnonzero(mask) % mask.shape[1]
    cmap = np.cumsum(cols) - 1
    kept = deg_right[deg_right > 0]
    indptr = np.zeros(kept.size + 1, dtype=np.int64)
    np.cumsum(kept, out=indptr[1:])
    return sp.csr_array((data, cmap[c], indptr), shape=(kept.size, int(cols.sum())))


def _degree_scores(d_left: float, d_right: float, mu0: float, mu_hat: float) -> dict:
    bound_r = math.sqrt(d_left - 1) + math.sqrt(d_right - 1)
    out = {"bound_r": bound_r, "delta_r": bound_r - mu_hat, "delta_r_norm": (bound_r - mu_hat) / bound_r}
    if mu0 < 1:  # ICLR'23: the eigen-form bound does not exist
        out.update(bound_s=None, delta_s=-1.0, delta_s_norm=None)
    else:
        bound_s = 2 * math.sqrt(mu0 - 1)
        out.update(bound_s=bound_s, delta_s=bound_s - mu_hat,
                   delta_s_norm=(bound_s - mu_hat) / bound_s if bound_s > 0 else None)
    return out


def _iterative(mask: np.ndarray, weight: np.ndarray | None, deg_left: np.ndarray, conv: Convention,
               dense_max: int) -> dict:
    """Scores averaged over the d-left-regular subgraphs (one per left degree d shared by enough nodes)."""
    order = np.argsort(deg_left, kind="stable")
    degs, starts, counts = np.unique(deg_left[order], return_index=True, return_counts=True)
    sums = {k: 0.0 for k in ("delta_r_imdb", "delta_r_imdb_norm", "delta_s_imdb", "delta_s_imdb_norm", "lambda_imsg")}
    n_s_norm = 0
    valid = 0
    total = 0
    for d, start, count in zip(degs.tolist(), starts.tolist(), counts.tolist()):
        if d == 0 or count < conv.min_group:
            continue
        total += 1
        idx = order[start:start + count]
        sub = mask[:, idx]
        n_out = int(np.count_nonzero(sub.any(axis=1)))
        if conv.invalid(d, d * count / n_out):
            continue
        valid += 1
        small = min(sub.shape) <= dense_max
        mat = sub if small else sp.csr_array(sub, dtype=np.float64)
        mu0, mu_hat = top2_singular(mat, dense_max)
        factor = max(count, n_out) / (count + n_out - 1) if conv.cheeger else 1.0
        s = _degree_scores(d, d * count / n_out, mu0, mu_hat)
        sums["delta_r_imdb"] += factor * s["delta_r"]
        sums["delta_r_imdb_norm"] += factor * s["delta_r_norm"]
        sums["delta_s_imdb"] += factor * s["delta_s"]
        if s["delta_s_norm"] is not None:
            sums["delta_s_imdb_norm"] += factor * s["delta_s_norm"]
            n_s_norm += 1
        if weight is not None:
            wsub = np.abs(weight[:, idx], dtype=np.float64) * sub
            w0, w_hat = top2_singular(wsub if small else sp.csr_array(wsub), dense_max)
            sums["lambda_imsg"] += factor * (w0 - w_hat)
    out: dict = {"imdb_subgraphs": valid, "imdb_groups": total}
    for k, v in sums.items():
        n = n_s_norm if k == "delta_s_imdb_norm" else valid
        out[k] = v / n if n and (k != "lambda_imsg" or weight is not None) else None
    return out


def analyze_layer(mask: np.ndarray, weight: np.ndarray | None = None, *, name: str = "", iterative: bool = True,
                  convention: str = "neurips23", dense_max: int = DENSE_MAX) -> dict:
    """All section-4 metrics of one layer as a flat JSON-friendly record (None = undefined)."""
    conv = CONVENTIONS[convention]
    mask, weight = _as_2d(name, mask, weight)
    d_out, d_in = mask.shape
    rec: dict = {"name": name, "status": "ok", "reason": None, "out": d_out, "in": d_in}
    rec.update({k: None for k in GRAPH_FIELDS[2:] + METRICS})
    rec.update(imdb_subgraphs=None, imdb_groups=None)
    if weight is not None and not np.isfinite(weight[mask]).all():
        weight = None  # a diverged run: its topology is still worth a look
        rec["weight_note"] = "non-finite weights: weighted metrics skipped"
    deg_right = np.count_nonzero(mask, axis=1)
    deg_left = np.count_nonzero(mask, axis=0)
    edges = int(deg_right.sum())
    rows, cols = deg_right > 0, deg_left > 0
    n_right, n_left = int(rows.sum()), int(cols.sum())
    rec.update(edges=edges, density=edges / max(1, d_out * d_in), n_left=n_left, n_right=n_right)
    if edges == 0:
        rec.update(status="skipped", reason="no edges")
        return rec
    d_left, d_right = edges / n_left, edges / n_right
    rec.update(d_left=d_left, d_right=d_right)
    why = conv.invalid(d_left, d_right)
    if why:
        rec.update(status="skipped", reason=f"too few edges: {why}")
        return rec

    b = _biadjacency(mask, deg_right, cols, np.ones(edges))
    mu0, mu_hat = top2_singular(b, dense_max)
    rec.update(mu0=mu0, mu_hat=mu_hat, **_degree_scores(d_left, d_right, mu0, mu_hat))
    rec["narc"] = ((mu_hat ** 2 / 4 + 1) * math.sqrt(n_left * n_right)
                   - abs(2 * edges - d_left / d_out * n_left * n_right)) / (d_in * d_out)
    if weight is not None:
        b.data = np.abs(weight[mask], dtype=np.float64)  # boolean indexing is row-major, like np.nonzero
        w0, w_hat = top2_singular(b, dense_max)
        rec.update({"mu0_w": w0, "mu_hat_w": w_hat, "lambda": w0 - w_hat})
    del b
    if iterative:
        rec.update(_iterative(mask, weight, deg_left, conv, dense_max))
        terms = (rec["delta_r"], rec["lambda"], rec["delta_r_imdb"], rec["lambda_imsg"])
        rec["full_spectrum"] = math.sqrt(sum((t or 0.0) ** 2 for t in terms))
    return rec


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def model_average(layers: Iterable[dict]) -> dict:
    """Mean of every metric over the layers where it is defined, with those counts."""
    layers = list(layers)
    out: dict = {"layers": len(layers), "scored": sum(r["status"] == "ok" for r in layers)}
    for k in METRICS:
        vals = [r[k] for r in layers if r.get(k) is not None and math.isfinite(r[k])]
        out[k] = float(np.mean(vals)) if vals else None
        out[f"n_{k}"] = len(vals)
    return out


def one_blas_thread() -> AbstractContextManager:
    """Single-threaded BLAS while analysing (where threadpoolctl is installed): the dense products here are
    small, so it costs nothing; it keeps results independent of `jobs`, and it avoids oversubscribing the
    cores (OpenBLAS threads spin) when layers run in threads or beside a training process."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def analyze_masks(masks: Mapping[str, tuple[np.ndarray, np.ndarray | None]], iterative: bool = True, *,
                  convention: str = "neurips23", dense_max: int = DENSE_MAX, jobs: int = 1, progress=None) -> dict:
    """Metrics of every layer (natural name order) plus model averages. `masks` may be lazy (a Mapping
    that loads on access), so only `jobs` layers are in memory at a time. jobs > 1 analyses layers in
    threads (the sparse products and LAPACK calls release the GIL); the numbers do not depend on it.
    `progress(name, record)` is called after each layer, in order. About 1 s per 1536x6144 layer per core:
    cheap enough for periodic use during training with jobs=1."""
    if convention not in CONVENTIONS:
        raise SiftError(f"unknown spectral convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    names = sorted(masks, key=_natural_key)

    def one(name: str) -> dict:
        mask, weight = masks[name]
        return analyze_layer(mask, weight, name=name, iterative=iterative, convention=convention,
                             dense_max=dense_max)

    layers = []
    with ExitStack() as stack:
        stack.enter_context(one_blas_thread())
        pool = stack.enter_context(ThreadPoolExecutor(jobs)) if jobs > 1 else None
        for rec in (pool.map(one, names) if pool is not None else map(one, names)):
            layers.append(rec)
            if progress is not None:
                progress(rec["name"], rec)
    return {"convention": convention, "iterative": iterative, "layers": layers, "model": model_average(layers)}


SUMMARY_LAYER_METRICS = ("delta_r", "lambda", "delta_r_imdb", "lambda_imsg")


def summary_scalars(result: dict, per_layer: bool = True, prefix: str = "spectral") -> dict[str, float]:
    """Flat {tag: value} for TensorBoard: model averages of every metric, plus the four headline metrics
    per layer. Undefined values are left out rather than logged as 0."""
    out: dict[str, float] = {}
    for k in METRICS:
        v = result["model"].get(k)
        if v is not None and math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    out[f"{prefix}/layers_scored"] = float(result["model"]["scored"])
    if per_layer:
        for rec in result["layers"]:
            for k in SUMMARY_LAYER_METRICS:
                v = rec.get(k)
                if v is not None and math.isfinite(v):
                    out[f"{prefix}_layers/{rec['name']}/{k}"] = float(v)
    return out


def model_scalars(layers: Iterable[dict], prefix: str = "spectral") -> dict[str, float]:
    """`summary_scalars(analyze_masks(masks), per_layer=False)` from layer records analysed anywhere (during
    training each pipeline stage analyses its own layers): the same names, order and numbers."""
    layers = sorted(layers, key=lambda r: _natural_key(r["name"]))
    return summary_scalars({"layers": layers, "model": model_average(layers)}, per_layer=False, prefix=prefix)
