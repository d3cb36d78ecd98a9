"""Spectral analysis of sparse mask topology (spec section 4): masks as bipartite graphs, Ramanujan gap,
weighted spectral gap and their iterative-mean variants, per layer and per model.

    from sift_megatron.spectral import analyze_masks, from_flat, read_masks, summary_scalars
    step, masks = read_masks("runs/x/checkpoints")          # {layer: (mask, weight | None)}
    result = analyze_masks(masks)                             # {"layers": [...], "model": {...}}

During training (spectral.interval), on the rank that holds the gathered tensors:
    tensors = gather_logical_masks(chunks)                    # sparse/export.py; None off rank 0
    for tag, value in summary_scalars(analyze_masks(from_flat(tensors))).items():
        tb.add_scalar(tag, value, step)

Names resolve lazily so that importing the CLI module does not pull in scipy.
"""

from __future__ import annotations

_EXPORTS = {
    "analyze_masks": "metrics", "analyze_layer": "metrics", "summary_scalars": "metrics",
    "model_average": "metrics", "top2_singular": "metrics", "CONVENTIONS": "metrics",
    "read_masks": "io", "open_masks": "io", "resolve_masks_file": "io", "from_flat": "io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
