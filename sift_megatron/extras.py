"""Optional features and the pip extras that bring them (pyproject.toml): a missing one is a one-line error that
names the extra, checked with importlib's finder before anything is imported (so it costs nothing)."""

from __future__ import annotations

import importlib.util

from sift_megatron.errors import SiftError

# import name -> (distribution, extra)
PACKAGES = {
    "datasets": ("datasets", "data"), "pyarrow": ("pyarrow", "data"), "zstandard": ("zstandard", "data"),
    "transformers": ("transformers", "convert"), "google.protobuf": ("protobuf", "convert"),
    "lm_eval": ("lm-eval", "eval"), "accelerate": ("accelerate", "eval"),
    "scipy": ("scipy", "analysis"), "matplotlib": ("matplotlib", "analysis"),
    "threadpoolctl": ("threadpoolctl", "analysis"), "wandb": ("wandb", "wandb"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or sys.modules holds None
        return False


def require(feature: str, *modules: str) -> None:
    """Raise a one-line SiftError when a module that `feature` needs is not installed."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        dists = sorted({PACKAGES[m][0] for m in missing})
        extras = sorted({PACKAGES[m][1] for m in missing})
        raise SiftError(f"{feature} needs {', '.join(dists)}, not installed here: pip install "
                        f"'sift-megatron[{','.join(extras)}]' (or those packages)")
