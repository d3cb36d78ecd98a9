"""The Sparse-IFT families as drop-in replacements of megatron's column/row-parallel linears.

Each module takes the constructor arguments megatron's SelfAttention / MLP pass to linear_qkv,
linear_proj, linear_fc1, linear_fc2 and returns (output, bias) like them, so a family is a layer-spec
change only. Tensor parallelism is exact (TP=2 computes the TP=1 function) because every non-linearity is
applied where its input is complete:

Sparse Parallel replaces sigma(W z) by sum_j sigma(W_j z) (spec 1.2): fc1, the one slot the dense model follows
with a non-linearity, applies the model's activation on each branch and the MLP's own activation is removed
(`BranchActivatedMLP`). QKV, proj and fc2 have none, so sparsity.parallel_branch_activation decides: "none" (the
formula read literally; the sum of linear branches is one linear map with the union of the masks) or a sigma
on every branch there too (a design choice of its own, not the paper's).

* Column-parallel slot (input replicated, output sharded over D_out):
  - parallel:   k sparse column-parallel branches; sigma is elementwise on each output shard. No extra comm.
  - factorized: U column-parallel with gathered output (full d on every rank), LayerNorm + sigma on the
                full vector, V column-parallel -> sharded output. One all-gather of [s, b, d].
  - doped:      sparse column-parallel W plus dense U (gathered, full r) and V (column-parallel).
* Row-parallel slot (input sharded over D_in, output full after an all-reduce):
  - parallel:   k sparse row-parallel branches, each all-reduced BEFORE its sigma (sigma of a partial
                sum is not the sum of sigmas): k all-reduces instead of one.
  - factorized: U row-parallel (all-reduce -> full d), LayerNorm + sigma, V column-parallel with gathered
                output and a replicated bias. One all-reduce of d plus one all-gather of D_out.
  - doped:      sparse row-parallel W plus dense U row-parallel (full r) and V column-parallel gathered.
Parameters that end up replicated (mid LayerNorm, replicated bias) get identical gradients on all TP ranks
because their inputs and output gradients are complete there, so they need no extra reduction.
Sequence parallelism is only supported for dense and wide (config check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP

from sift_megatron.sparse.layers import SparseColumnParallelLinear, SparseRowParallelLinear


def _common(kwargs: dict) -> dict:
    keep = ("config", "init_method", "is_expert", "tp_group")
    return {k: kwargs[k] for k in keep if k in kwargs}


def _out(kwargs: dict) -> dict:
    """For the sub-layer that produces the slot's output: megatron's comm-buffer name, which marks the fused
    QKV output whose Q, K and V rows get one mask budget each (sparse.layers.budget_parts)."""
    return {"tp_comm_buffer_name": kwargs["tp_comm_buffer_name"]} if "tp_comm_buffer_name" in kwargs else {}


class _Family(torch.nn.Module):
    """Base: remembers whether the caller wants the bias returned separately (skip_bias_add)."""

    def __init__(self, kwargs: dict) -> None:
        super().__init__()
        self.skip_bias_add = kwargs.get("skip_bias_add", False)
        self.config = kwargs["config"]

    def _ret(self, out: torch.Tensor, bias: torch.Tensor | None):
        if bias is None or self.skip_bias_add:
            return out, bias
        return out + bias, None

    def backward_dw(self) -> None:  # megatron calls this only with delayed wgrad compute
        pass


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ParallelBranches(_Family):
    """psi(z) = sum_j sigma(W_j z + b_j), k = round(1/(1-s)) sparse branches, column- or row-parallel like the
    slot they replace (row-parallel branches are each all-reduced before their sigma).

    activation: "model" (the model's activation: fc1), "gelu", "relu" or "none" (linear branches)."""

    def __init__(self, input_size: int, output_size: int, *, branches: int, column: bool, activation: str,
                 **kwargs) -> None:
        super().__init__(kwargs)
        bias, c = kwargs.get("bias", True), {**_common(kwargs), **_out(kwargs)}
        if column:
            make = lambda: SparseColumnParallelLinear(input_size, output_size, bias=bias, gather_output=False,  # noqa: E731
                                                      skip_bias_add=False, **c)
        else:
            make = lambda: SparseRowParallelLinear(input_size, output_size, bias=bias, input_is_parallel=True,  # noqa: E731
                                                   skip_bias_add=False, **c)
        self.branches = torch.nn.ModuleList(make() for _ in range(branches))
        acts = {"model": self.config.activation_func, "gelu": F.gelu, "relu": F.relu, "none": _identity}
        if activation not in acts:
            raise ValueError(f"branch activation must be one of {', '.join(acts)}, got {activation!r}")
        self.act = acts[activation]

    def forward(self, x: torch.Tensor):
        return sum(self.act(b(x)[0]) for b in self.branches), None


class BranchActivatedMLP(MLP):
    """megatron's MLP without its own activation: Sparse Parallel's fc1 branches already applied it
    (sum_j sigma(W_j x + b_j), not sigma(sum_j sigma(...)))."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        if c.bias_activation_fusion or c.use_te_activation_func or c.gated_linear_unit:
            raise ValueError("Sparse Parallel fc1 needs bias_activation_fusion, use_te_activation_func and "
                             "gated_linear_unit off (the branches apply the activation)")
        self.activation_func = _identity


class FactorizedColumn(_Family):
    """psi(z) = V sigma(LN(U z)), U: D_in -> d and V: d -> D_out both sparse."""

    def __init__(self, input_size: int, output_size: int, *, inner: int, **kwargs) -> None:
        super().__init__(kwargs)
        c = _common(kwargs)
        self.u = SparseColumnParallelLinear(input_size, inner, bias=False, gather_output=True,
                                            skip_bias_add=False, **c)
        self.norm = torch.nn.LayerNorm(inner, eps=self.config.layernorm_epsilon)
        self.v = SparseColumnParallelLinear(inner, output_size, bias=kwargs.get("bias", True),
                                            gather_output=False, skip_bias_add=True, **c, **_out(kwargs))
        self.act = self.config.activation_func

    def forward(self, x: torch.Tensor):
        h = self.act(self.norm(self.u(x)[0]))
        out, bias = self.v(h)
        return self._ret(out, bias)


class FactorizedRow(_Family):
    def __init__(self, input_size: int, output_size: int, *, inner: int, **kwargs) -> None:
        super().__init__(kwargs)
        c = _common(kwargs)
        self.u = SparseRowParallelLinear(input_size, inner, bias=False, input_is_parallel=True,
                                         skip_bias_add=False, **c)
        self.norm = torch.nn.LayerNorm(inner, eps=self.config.layernorm_epsilon)
        self.v = SparseColumnParallelLinear(inner, output_size, bias=False, gather_output=True,
                                            skip_bias_add=False, **c)
        self.bias = torch.nn.Parameter(torch.zeros(output_size)) if kwargs.get("bias", True) else None
        self.act = self.config.activation_func

    def forward(self, x: torch.Tensor):
        h = self.act(self.norm(self.u(x)[0]))
        return self._ret(self.v(h)[0], self.bias)


class DopedColumn(_Family):
    """psi(z) = W_s z + V U z: full-size sparse W_s plus a DENSE, unmasked rank-r U V."""

    def __init__(self, input_size: int, output_size: int, *, inner: int, **kwargs) -> None:
        super().__init__(kwargs)
        c = _common(kwargs)
        self.sparse = SparseColumnParallelLinear(input_size, output_size, bias=kwargs.get("bias", True),
                                                 gather_output=False, skip_bias_add=True, **c, **_out(kwargs))
        self.u = ColumnParallelLinear(input_size, inner, bias=False, gather_output=True, **c)
        self.v = ColumnParallelLinear(inner, output_size, bias=False, gather_output=False, **c)

    def forward(self, x: torch.Tensor):
        out, bias = self.sparse(x)
        out = out + self.v(self.u(x)[0])[0]
        return self._ret(out, bias)


class DopedRow(_Family):
    def __init__(self, input_size: int, output_size: int, *, inner: int, **kwargs) -> None:
        super().__init__(kwargs)
        c = _common(kwargs)
        self.sparse = SparseRowParallelLinear(input_size, output_size, bias=kwargs.get("bias", True),
                                              input_is_parallel=True, skip_bias_add=True, **c)
        self.u = RowParallelLinear(input_size, inner, bias=False, input_is_parallel=True,
                                   skip_bias_add=False, **c)
        self.v = ColumnParallelLinear(inner, output_size, bias=False, gather_output=True, **c)

    def forward(self, x: torch.Tensor):
        out, bias = self.sparse(x)
        out = out + self.v(self.u(x)[0])[0]
        return self._ret(out, bias)

