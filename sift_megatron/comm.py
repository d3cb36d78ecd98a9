"""The only module of ours that calls torch.distributed collectives.

Why: NCCL moves only CUDA tensors and gloo only CPU tensors, while our callers hold tensors wherever they were
made (masks built before DeepSpeed moves the model, counts and flags built on the CPU). Every tensor goes over
the wire on the device of the group's backend and comes back on the caller's device, in place where torch's
collective is in place. tests/test_comm.py fails if any other module calls a collective directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ReduceOp", "all_gather", "all_gather_object", "all_reduce", "barrier", "broadcast_object",
           "comm_device", "destroy", "gather", "gather_dim0", "is_initialized", "rank", "recv", "reduce_scatter_dim0",
           "send", "world_size"]

ReduceOp = dist.ReduceOp


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def comm_device(group=None) -> torch.device:
    """Where tensors of `group` must live: the current CUDA device for NCCL, the CPU otherwise."""
    if is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce of `t` (any device); returns `t`. A no-op without a process group."""
    if not is_initialized():
        return t
    dev = comm_device(group)
    if t.device == dev:
        dist.all_reduce(t, op=op, group=group)
        return t
    wire = t.to(dev)
    dist.all_reduce(wire, op=op, group=group)
    t.copy_(wire)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on all ranks), in group-rank order, on `t`'s device."""
    if not is_initialized():
        return [t]
    dev = comm_device(group)
    wire = t.detach().contiguous().to(dev)
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, wire, group=group)
    return [p.to(t.device) for p in parts]


def gather(t: torch.Tensor, dst: int = 0, group=None) -> list[torch.Tensor] | None:
    """Every rank's `t` (same shape on all ranks), in group-rank order, on `t`'s device, on group rank `dst`
    only (None elsewhere): one tensor per rank lands on one rank, not on all of them as with all_gather."""
    if not is_initialized():
        return [t]
    dev = comm_device(group)
    wire = t.detach().contiguous().to(dev)
    mine = dist.get_rank(group) == dst
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))] if mine else None
    dist.gather(wire, parts, dst=dst if group is None else dist.get_global_rank(group, dst), group=group)
    return [p.to(t.device) for p in parts] if mine else None


def gather_dim0(t: torch.Tensor, group=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in group-rank order (sequence parallelism's all-gather), into
    `out` when given (a reused buffer), on `t`'s device."""
    size = [t.shape[0] * world_size(group), *t.shape[1:]]
    if out is None:
        out = torch.empty(size, dtype=t.dtype, device=t.device)
    if not is_initialized():
        return out.copy_(t)
    dev = comm_device(group)
    wire = out if out.device == dev else torch.empty(size, dtype=t.dtype, device=dev)
    dist.all_gather_into_tensor(wire, t.contiguous().to(dev), group=group)
    return out if wire is out else out.copy_(wire)


def reduce_scatter_dim0(t: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's dim-0 slice of the sum of every rank's `t` (sequence parallelism's reduce-scatter)."""
    if not is_initialized():
        return t
    dev = comm_device(group)
    out = torch.empty([t.shape[0] // world_size(group), *t.shape[1:]], dtype=t.dtype, device=dev)
    dist.reduce_scatter_tensor(out, t.contiguous().to(dev), group=group)
    return out.to(t.device)


def send(t: torch.Tensor, dst: int) -> None:
    """Point-to-point: `t` (any device) to global rank `dst`, which calls `recv` with its shape and dtype."""
    dist.send(t.detach().contiguous().to(comm_device()), dst)


def recv(shape, dtype: torch.dtype, src: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor global rank `src` sends with `send` (its shape and dtype known here), on `device`."""
    wire = torch.empty(tuple(shape), dtype=dtype, device=comm_device())
    dist.recv(wire, src)
    return wire.to(device)


def all_gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's picklable `obj` (small metadata only: shapes, names, error strings), in group-rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """`obj` of global rank `src` on every rank (small metadata only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if is_initialized():
        if dist.get_backend(group) == "nccl":  # tell NCCL the device, or it guesses (and warns)
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
