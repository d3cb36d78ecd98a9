"""Layer specs of the Sparse-IFT families: swapping a family is a ModuleSpec change, not a new model."""

from __future__ import annotations

import copy

from sift_megatron.ift.sizes import ModelShape
from sift_megatron.layout import SLOTS


def layer_spec(shape: ModelShape):
    """megatron-core local GPT layer spec with the four transformed linears replaced for `shape.family`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from sift_megatron.ift import layers as L
    from sift_megatron.sparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear

    spec = copy.deepcopy(get_gpt_layer_local_spec())
    if shape.family == "dense":
        return spec
    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    def slot(name: str):
        col = SLOTS[name][1]
        if shape.family == "wide":
            return SparseColumnParallelLinear if col else SparseRowParallelLinear
        if shape.family == "parallel":
            act = "model" if name == "linear_fc1" else shape.branch_activation
            return ModuleSpec(module=L.ParallelBranches,
                              params={"branches": shape.branches, "column": col, "activation": act})
        cls = {"factorized": (L.FactorizedColumn, L.FactorizedRow), "doped": (L.DopedColumn, L.DopedRow)}
        return ModuleSpec(module=cls[shape.family][0 if col else 1], params={"inner": shape.inner[name]})

    attn.linear_qkv, attn.linear_proj = slot("linear_qkv"), slot("linear_proj")
    mlp.linear_fc1, mlp.linear_fc2 = slot("linear_fc1"), slot("linear_fc2")
    if shape.family == "parallel":  # fc1's branches apply the activation, the MLP must not apply it again
        spec.submodules.mlp.module = L.BranchActivatedMLP
        _quiet_unknown_mlp()
    return spec


def _quiet_unknown_mlp() -> None:
    """megatron's TransformerLayer warns "Unknown MLP type" for any MLP subclass and builds it with default
    kwargs, which for BranchActivatedMLP are MLP's (the TP group comes from parallel_state): drop that warning."""
    import logging

    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(getattr(f, "sift_unknown_mlp", False) for f in log.filters):
        f = logging.Filter()
        f.filter = lambda rec: "Unknown MLP type" not in rec.getMessage()  # type: ignore[method-assign]
        f.sift_unknown_mlp = True  # type: ignore[attr-defined]
        log.addFilter(f)
