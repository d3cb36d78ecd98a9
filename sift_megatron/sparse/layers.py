"""Sparse versions of megatron's ColumnParallelLinear / RowParallelLinear.

Each keeps a bool `mask` buffer shaped and sharded exactly like its weight shard. Invariant: masked weights
are exactly zero. It holds after init (weights multiplied by the mask), and every optimizer step keeps it:
the gradient at masked positions is zeroed by a hook, so Adam's moments stay zero there, the update is 0
and decoupled weight decay of 0 is 0. The forward therefore uses the weight as is, with no per-micro-batch
full-weight multiply; the only extra work is one in-place multiply of the accumulated weight gradient per
micro-batch backward. On DST steps a second hook sums the dense (unmasked) gradient for RigL's grow criterion.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class _SparseWeightMixin:
    """Mask buffer, gradient masking and dense-gradient capture for a TP-sharded linear weight."""

    weight: torch.nn.Parameter
    partition_dim: int  # of the weight: 0 for column-parallel, 1 for row-parallel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the megatron linear builds (and initialises) the weight
        self._init_sparse()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return self._shard_mask_in_checkpoint(sd, prefix, sharded_offsets, metadata)

    def _init_sparse(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool), persistent=True)
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self.weight.sparse_module = self  # lets optimizer-side code find the mask of a parameter
        self.weight.register_hook(self._capture_grad)
        # Registered before deepspeed.initialize, so it runs before ZeRO's / BF16_Optimizer's own
        # post-accumulate hooks take the gradient.
        self.weight.register_post_accumulate_grad_hook(self._mask_grad)

    def _capture_grad(self, grad: torch.Tensor) -> None:
        """Sum the micro-batch's unmasked gradient on DST update steps (RigL grows by it)."""
        if self.capture_dense_grad:
            g = grad.detach().float()
            self.dense_grad = g.clone() if self.dense_grad is None else self.dense_grad.add_(g)

    def _mask_grad(self, param: torch.Tensor) -> None:
        """Zero the accumulated gradient where masked, in place: an out-of-place `grad * mask` in a tensor hook
        allocated (and page-faulted) a weight-sized tensor per weight per micro-batch."""
        if param.grad is not None:
            param.grad.mul_(self._float_mask(param.grad.dtype))

    def _float_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a float tensor, cached until the bool mask changes in place (DST, checkpoint load):
        float x float multiplies 5x faster than float x bool on CPU."""
        key = (self.mask._version, dtype, self.mask.data_ptr())
        if getattr(self, "_fmask_key", None) != key:
            self._fmask = self.mask.to(dtype)
            self._fmask_key = key
        return self._fmask

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a new local mask and zero the weight where it is off."""
        self.mask.copy_(mask)
        self.weight.data.mul_(self.mask)

    def global_index(self) -> torch.Tensor:
        """Flat indices of this shard's elements in the logical (TP=1) weight, row-major."""
        from megatron.core import parallel_state as ps

        rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        rows, cols = self.weight.shape
        dev = self.weight.device
        if self.partition_dim == 0:
            return torch.arange(rows * cols, device=dev, dtype=torch.int64) + rank * rows * cols
        full_cols = cols * tp
        r = torch.arange(rows, device=dev, dtype=torch.int64).unsqueeze(1) * full_cols
        c = torch.arange(cols, device=dev, dtype=torch.int64).unsqueeze(0) + rank * cols
        return (r + c).reshape(-1)

    def logical_shape(self) -> tuple[int, int]:
        from megatron.core import parallel_state as ps

        shape = list(self.weight.shape)
        shape[self.partition_dim] *= ps.get_tensor_model_parallel_world_size()
        return tuple(shape)

    def _shard_mask_in_checkpoint(self, sharded: dict, prefix: str, sharded_offsets, metadata) -> dict:
        """The mask is sharded like the weight (megatron would otherwise save it as replicated)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        extra = make_sharded_tensors_for_checkpoint({"mask": self.mask}, prefix, {"mask": self.partition_dim},
                                                    sharded_offsets, tp_group=self.tp_group,
                                                    dp_cp_group=(metadata or {}).get("dp_cp_group"))
        sharded.update(extra)
        return sharded


class SparseColumnParallelLinear(_SparseWeightMixin, ColumnParallelLinear):
    partition_dim = 0


class SparseRowParallelLinear(_SparseWeightMixin, RowParallelLinear):
    partition_dim = 1


def sparse_modules(model: torch.nn.Module) -> list[tuple[str, _SparseWeightMixin]]:
    """(layout-independent weight name, module) of every sparse linear in a model chunk."""
    from sift_megatron.models.gpt import global_param_names

    names = {id(p): n for n, p in global_param_names(model)}
    return [(names[id(m.weight)], m) for m in model.modules() if isinstance(m, _SparseWeightMixin)]


@torch.no_grad()
def init_model_masks(chunks: list[torch.nn.Module], seed: int, sparsity: float, distribution: str = "uniform",
                     tp_group=None) -> dict[str, float]:
    """Random exact-count masks, a pure function of (seed, weight name, global element index): scores come
    from a counter-based hash and the top-nnz is selected over each whole logical tensor by one batched
    distributed selection over the TP group. So any TP/PP layout gets the same logical masks, and no rank
    materialises a full weight. Returns the density of each sparse tensor."""
    from sift_megatron.sparse.masks import hash_scores, layer_densities, nnz_for
    from sift_megatron.sparse.topk import topk_mask_keys

    mods = [nm for chunk in chunks for nm in sparse_modules(chunk)]
    if not mods:
        return {}
    shapes = {name: m.logical_shape() for name, m in mods}
    densities = _global_densities(shapes, sparsity, distribution, layer_densities)
    idx = [m.global_index() for _, m in mods]
    keys = [hash_scores(seed, name, i) for (name, _), i in zip(mods, idx)]
    ks = [nnz_for(int(torch.tensor(shapes[name]).prod()), densities[name]) for name, _ in mods]
    masks = topk_mask_keys(keys, ks, group=tp_group)
    for (_, m), mask in zip(mods, masks):
        m.set_mask(mask.view_as(m.weight))
    return {name: densities[name] for name, _ in mods}


def _global_densities(shapes: dict, sparsity: float, distribution: str, layer_densities) -> dict[str, float]:
    """ERK needs every sparse tensor of the model, also those on other pipeline stages: gather the shapes
    over the pipeline group so every stage solves the same ERK problem."""
    if distribution == "uniform":
        return {n: 1.0 - sparsity for n in shapes}
    from megatron.core import parallel_state as ps

    from sift_megatron import comm

    all_shapes = dict(shapes)
    if comm.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        for g in comm.all_gather_object(shapes, group=ps.get_pipeline_model_parallel_group()):
            all_shapes.update(g)
    dens = layer_densities(all_shapes, sparsity, distribution)
    return {n: dens[n] for n in shapes}
