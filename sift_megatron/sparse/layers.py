"""Sparse versions of megatron's ColumnParallelLinear / RowParallelLinear.

Each keeps a bool `mask` buffer shaped and sharded exactly like its weight shard. Invariant: masked weights
are exactly zero. It holds after init (weights multiplied by the mask), and every optimizer step keeps it:
the gradient at masked positions is zeroed by a hook, so Adam's moments stay zero there, the update is 0
and decoupled weight decay of 0 is 0. The forward therefore uses the weight as is, with no per-micro-batch
full-weight multiply; the only extra work is one in-place multiply of the accumulated weight gradient per
micro-batch backward. On DST steps a second hook sums the dense (unmasked) gradient for RigL's grow criterion.

`sparsity.kernel=block` (`use_block_kernel`) swaps megatron's linear for sparse/block_linear.py's at the
`_forward_impl` seam: the same weights, masks and hooks, GEMMs over the mask's nonzero tiles only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class _SparseWeightMixin:
    """Mask buffer, gradient masking and dense-gradient capture for a TP-sharded linear weight."""

    weight: torch.nn.Parameter
    partition_dim: int  # of the weight: 0 for column-parallel, 1 for row-parallel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the megatron linear builds (and initialises) the weight
        # megatron names the fused QKV linear's comm buffer "qkv"; the families pass it to the sparse layer
        # whose output rows are Q, K and V, so those get one mask budget each (budget_parts)
        self.fused_qkv = kwargs.get("tp_comm_buffer_name") == "qkv"
        self._init_sparse()

    def _init_sparse(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool), persistent=True)
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self.kernel_block = 0  # > 0: sparsity.kernel=block with this tile side (use_block_kernel)
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

    def block_layout(self):
        """The mask's BlockLayout (sparse/block_linear.py), cached like `_float_mask` until the mask changes."""
        from sift_megatron.sparse.block_linear import BlockLayout

        key = (self.mask._version, self.mask.data_ptr(), self.kernel_block)
        if getattr(self, "_layout_key", None) != key:
            self._layout = BlockLayout.from_mask(self.mask, self.kernel_block)
            self._layout_key = key
        return self._layout

    def _forward_impl(self, input, weight, *args, **kwargs):
        """megatron's linear, or the block-sparse one with the same arguments and communication."""
        if not self.kernel_block or not weight.requires_grad:
            return super()._forward_impl(input, weight, *args, **kwargs)
        from sift_megatron.sparse.block_linear import block_linear

        return block_linear(self, input, weight, *args, **kwargs)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a new local mask and zero the weight where it is off."""
        self.mask.copy_(mask)
        self.weight.data.mul_(self.mask)

    def global_index(self) -> torch.Tensor:
        """Global flat indices [rows, cols] of this shard's elements in the logical (TP=1) weight."""
        from megatron.core import parallel_state as ps

        from sift_megatron.sparse.masks import shard_global_index

        return shard_global_index(self.logical_shape(), self.partition_dim, ps.get_tensor_model_parallel_rank(),
                                  ps.get_tensor_model_parallel_world_size(), device=self.weight.device)

    def budget_parts(self) -> list[tuple[str, tuple[int, int], torch.Tensor | None]]:
        """(suffix, logical shape, local row indices) of each part of the weight that keeps its own exact
        nnz: the Q, K and V rows of a fused QKV weight (modelzoo masks Q, K and V as separate tensors, so RigL
        cannot move density between them), else the whole weight (rows None).

        megatron's fused QKV rows are [ng groups x (q rows of the group's heads, k rows, v rows)], the same
        logical layout at every TP degree; a column-parallel shard holds whole contiguous rows of it."""
        shape = self.logical_shape()
        if not self.fused_qkv:
            return [("", shape, None)]
        c = self.config
        heads, hn = c.num_attention_heads, c.kv_channels
        groups = c.num_query_groups or heads
        per_group = (heads // groups + 2) * hn
        if self.partition_dim != 0 or shape[0] != groups * per_group:
            raise ValueError(f"fused QKV weight of logical shape {shape} does not match {groups} groups x "
                             f"{per_group} rows (column-parallel)")
        offset = self.global_index()[:, 0] // shape[1] % per_group  # logical row within its query group
        q_rows = heads // groups * hn
        part = (offset >= q_rows).long() + (offset >= q_rows + hn).long()
        sizes = {"q": heads * hn, "k": groups * hn, "v": groups * hn}
        return [(f":{n}", (size, shape[1]), torch.nonzero(part == i).reshape(-1))
                for i, (n, size) in enumerate(sizes.items())]

    def logical_shape(self) -> tuple[int, int]:
        from megatron.core import parallel_state as ps

        shape = list(self.weight.shape)
        shape[self.partition_dim] *= ps.get_tensor_model_parallel_world_size()
        return tuple(shape)


class SparseColumnParallelLinear(_SparseWeightMixin, ColumnParallelLinear):
    partition_dim = 0


class SparseRowParallelLinear(_SparseWeightMixin, RowParallelLinear):
    partition_dim = 1


def sparse_modules(model: torch.nn.Module) -> list[tuple[str, _SparseWeightMixin]]:
    """(layout-independent weight name, module) of every sparse linear in a model chunk."""
    from sift_megatron.sharding import global_param_names

    names = {id(p): n for n, p in global_param_names(model)}
    return [(names[id(m.weight)], m) for m in model.modules() if isinstance(m, _SparseWeightMixin)]


def use_block_kernel(chunks: list[torch.nn.Module], block: int) -> int:
    """sparsity.kernel=block: every sparse linear of the chunks computes over its mask's b x b tiles (the masks
    must be made of whole tiles: pattern=block with this block). Returns how many modules switched."""
    mods = [m for chunk in chunks for _, m in sparse_modules(chunk)]
    for m in mods:
        m.kernel_block = block
        m.block_layout()  # built now: a mask not made of whole tiles is an error at start-up, not mid-step
    return len(mods)


@dataclass(frozen=True)
class BudgetPart:
    """One separately budgeted part of a sparse weight (see `_SparseWeightMixin.budget_parts`): index of its
    module in the list it came from, name (weight name + ":q"/":k"/":v" or ""), logical shape, local rows."""

    module: int
    name: str
    shape: tuple[int, int]
    rows: torch.Tensor | None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This part's rows of a weight-shaped local tensor (the tensor itself when the part is whole)."""
        return t if self.rows is None else t.index_select(0, self.rows)


def budget_parts(mods: list[tuple[str, _SparseWeightMixin]]) -> list[BudgetPart]:
    return [BudgetPart(i, name + suffix, shape, rows)
            for i, (name, m) in enumerate(mods) for suffix, shape, rows in m.budget_parts()]


def join_parts(mods: list[tuple[str, _SparseWeightMixin]], parts: list[BudgetPart],
               values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per module, the weight-shaped tensor whose part rows are `values` (one per part, in `parts` order)."""
    out: list[torch.Tensor | None] = [None] * len(mods)
    for p, v in zip(parts, values):
        if p.rows is None:
            out[p.module] = v.view_as(mods[p.module][1].weight)
            continue
        if out[p.module] is None:
            out[p.module] = torch.empty_like(mods[p.module][1].weight, dtype=v.dtype)
        out[p.module][p.rows] = v.view(len(p.rows), out[p.module].shape[1])
    return out  # type: ignore[return-value]


@torch.no_grad()
def init_model_masks(chunks: list[torch.nn.Module], seed: int, sparsity: float, distribution: str = "uniform",
                     tp_group=None, pattern: str = "unstructured", block: int = 1) -> dict[str, float]:
    """Random exact-count masks, a pure function of (seed, weight name, global element index): scores come
    from a counter-based hash and the top-nnz is selected over each whole logical tensor (each of Q, K and V
    for a fused QKV weight) by one batched distributed selection over the TP group. So any TP/PP layout gets
    the same logical masks, and no rank materialises a full weight. Returns the density of each sparse weight.

    pattern=block: the same on the tile grid: every b x b tile is scored by the hash of its global tile index
    and exactly nnz_for(tiles, density) tiles of each part are kept. pattern=N:M: in every group of M
    consecutive input elements the N of largest element hash (density N/M; local, no collective)."""
    from sift_megatron.pattern import parse_pattern
    from sift_megatron.sparse.masks import MaskSpec, hash_scores, init_mask_local, layer_densities, nnz_for
    from sift_megatron.sparse.structure import block_ids, expand_blocks, nm_top

    pat = parse_pattern(pattern, block)
    mods = [nm for chunk in chunks for nm in sparse_modules(chunk)]
    if not mods:
        return {}
    parts = budget_parts(mods)
    if pat.kind == "nm":
        _check_nm_density(pat, sparsity, distribution)
        for name, m in mods:
            check_structure(name, m, pat)
            m.set_mask(nm_top(hash_scores(seed, name, m.global_index()), pat.n, pat.m))
        return {name: pat.n / pat.m for name, _ in mods}
    densities = _global_densities({p.name: p.shape for p in parts}, sparsity, distribution, layer_densities)
    b = pat.block  # block=1: one key per element; else one per tile of each part, hashed from its global tile index
    for name, m in mods if b > 1 else ():
        check_structure(name, m, pat)
    gidx = [m.global_index() for _, m in mods]
    specs = [MaskSpec(mods[p.module][0], (p.shape[0] // b, p.shape[1] // b), densities[p.name],
                      block_ids(p.take(gidx[p.module]), p.shape[1], b) if b > 1 else p.take(gidx[p.module]))
             for p in parts]
    masks = init_mask_local(specs, seed, group=tp_group)
    for (_, m), mask in zip(mods, join_parts(mods, parts, [expand_blocks(t, b) if b > 1 else t for t in masks])):
        m.set_mask(mask)
    kept = [0] * len(mods)
    for p, spec in zip(parts, specs):
        kept[p.module] += nnz_for(math.prod(spec.shape), spec.density) * b * b
    return {name: kept[i] / math.prod(m.logical_shape()) for i, (name, m) in enumerate(mods)}


def check_structure(name: str, module: _SparseWeightMixin, pat) -> None:
    """One-line error unless this rank's shard (and each Q / K / V part of it) holds whole tiles / N:M groups:
    TP splits dim 0 of a column-parallel weight and dim 1 of a row-parallel one, and a tile or group must never
    straddle a shard boundary."""
    from megatron.core import parallel_state as ps

    from sift_megatron.errors import SiftError
    from sift_megatron.sparse.structure import block_ids, nm_groups

    gidx = module.global_index()
    cols = module.logical_shape()[1]
    try:
        if pat.kind == "nm":
            nm_groups(gidx, cols, pat.m)
        else:
            block_ids(gidx, cols, pat.block)
            for _, _, rows in module.budget_parts():
                if rows is not None:
                    block_ids(gidx.index_select(0, rows), cols, pat.block)
    except ValueError as e:
        what = (f"sparsity.pattern={pat.n}:{pat.m} (groups of {pat.m} input elements)" if pat.kind == "nm" else
                f"sparsity.block={pat.block}")
        qkv = " and each of its Q, K, V row blocks (head dim)" if module.fused_qkv and pat.kind == "block" else ""
        raise SiftError(f"{what} does not fit {name}: logical shape {tuple(module.logical_shape())}, local shard "
                        f"{tuple(module.weight.shape)} at parallel.tensor={ps.get_tensor_model_parallel_world_size()}"
                        f" (each shard{qkv} must be a whole number of aligned blocks: {e})") from None


def _check_nm_density(pat, sparsity: float, distribution: str) -> None:
    from sift_megatron.errors import SiftError

    want = 1.0 - pat.n / pat.m
    if abs(sparsity - want) > 1e-9:
        raise SiftError(f"sparsity.pattern={pat.n}:{pat.m} keeps density {pat.n}/{pat.m}: the sparsity used must be "
                        f"{want:g}, got {sparsity:g} (set sparsity.s={want:g}; exact_iso / align re-solve s)")
    if distribution != "uniform":
        raise SiftError(f"sparsity.pattern={pat.n}:{pat.m} needs sparsity.distribution=uniform (every tensor at "
                        f"{pat.n}/{pat.m}), got {distribution!r}")


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
