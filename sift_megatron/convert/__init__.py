"""Checkpoint conversion (`sift convert`) and evaluation (`sift eval`).

Importing this package makes the exported Sparse Parallel / Factorized architecture ("sift_gpt", see
modeling_sift.py) known to transformers' AutoConfig and AutoModelForCausalLM. transformers (and torch) take
seconds to import and `sift --help` imports this package, so registration is deferred: done now if
transformers is already imported, else right after the process first imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["register_auto_classes"]


def register_auto_classes() -> None:
    """Register SiftGPTConfig / SiftGPTForCausalLM with the transformers Auto classes (idempotent)."""
    import sift_megatron.convert.modeling_sift  # noqa: F401  (registers on import)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """One-shot import hook: wraps the loader of `transformers` so registration runs once it has loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_auto_classes()
            except Exception as e:  # never break the user's `import transformers`
                warnings.warn(f"sift_megatron.convert: could not register sift_gpt with transformers: {e}",
                              stacklevel=2)

        loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
