"""Spectral analysis of sparse mask topology (spec section 4): masks as bipartite graphs, Ramanujan gap,
weighted spectral gap and their iterative-mean variants, per layer and per model.

    from sift_megatron.spectral import analyze_masks, from_flat, read_masks, summary_scalars
    step, masks = read_masks("runs/x/checkpoints")          # {layer: (mask, weight | None)}
    result = analyze_masks(masks)                             # {"layers": [...], "model": {...}}

During training (spectral.interval) nothing gathers the whole model: each pipeline stage assembles its layers
one at a time, round-robin over its TP ranks (sparse/export.py map_logical_layers), `analyze_layer` scores
each, and the small records meet on every rank, where `model_scalars(records)` equals
`summary_scalars(analyze_masks(masks), per_layer=False)` (training/trainer.py stream_spectral_scalars).

Names resolve lazily so that importing the CLI module does not pull in scipy.
"""

from __future__ import annotations

_EXPORTS = {
    "analyze_masks": "metrics", "analyze_layer": "metrics", "summary_scalars": "metrics",
    "model_average": "metrics", "model_scalars": "metrics", "top2_singular": "metrics", "CONVENTIONS": "metrics",
    "read_masks": "io", "open_masks": "io", "resolve_masks_file": "io", "from_flat": "io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
