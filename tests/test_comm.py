"""Every torch.distributed collective of our code goes through sift_megatron/comm.py (NCCL needs CUDA tensors,
gloo CPU tensors: comm puts them on the backend's device), so a direct call anywhere else is a test failure."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from sift_megatron import comm

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "barrier", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv",
}
ALLOWED = {Path("sift_megatron/comm.py")}


def _direct_collectives(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of collectives reached through an alias of torch.distributed or imported from it."""
    aliases = {"torch.distributed"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            hits.append((node.lineno, ast.unparse(f)))
        elif isinstance(f, ast.Name) and f.id in imported:
            hits.append((node.lineno, f.id))
    return hits


def test_no_collective_outside_comm():
    files = sorted(p for d in ("sift_megatron", "data_prep") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 30
    bad = [f"{p.relative_to(REPO)}:{line}: {call}" for p in files if p.relative_to(REPO) not in ALLOWED
           for line, call in _direct_collectives(ast.parse(p.read_text()))]
    assert not bad, "torch.distributed collectives outside sift_megatron/comm.py:\n" + "\n".join(bad)


def test_detector_sees_every_spelling():
    src = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as D\n"
           "from torch.distributed import all_gather_object as ago\n"
           "dist.all_reduce(x)\nD.barrier()\ntorch.distributed.broadcast(x, 0)\nago(a, b)\ndist.get_rank()\n")
    found = sorted(c for _, c in _direct_collectives(ast.parse(src)))
    assert found == sorted(["dist.all_reduce", "D.barrier", "torch.distributed.broadcast", "ago"])


def test_single_process_calls_are_identity():
    """Without a process group (one-process tools, tests) every helper is the one-rank result."""
    t = torch.arange(4.0)
    assert comm.all_reduce(t) is t and t.tolist() == [0, 1, 2, 3]
    assert [p.tolist() for p in comm.all_gather(t)] == [[0, 1, 2, 3]]
    assert [p.tolist() for p in comm.gather(t)] == [[0, 1, 2, 3]]
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    assert comm.broadcast_object("x") == "x"
    assert comm.rank() == 0 and comm.world_size() == 1 and comm.comm_device() == torch.device("cpu")
    comm.barrier()
