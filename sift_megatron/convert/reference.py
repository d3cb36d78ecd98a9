"""The ground truth an export is checked against: megatron's own forward of a checkpoint.

Builds the model exactly as training does (same layer spec, same Sparse-IFT modules) on a one-rank gloo
group, loads model.safetensors by global parameter name (masks into the sparse modules' mask buffers) and
returns megatron's logits. Used by the tests and by `python -m sift_megatron.convert.reference` (which runs
it in a fresh process, so a test process never holds a megatron process group).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from sift_megatron.errors import SiftError


def _ensure_single_rank() -> None:
    from sift_megatron import platform

    platform.init_distributed()
    from megatron.core import parallel_state as ps

    from sift_megatron import comm

    if comm.world_size() != 1:
        raise SiftError(f"the reference forward runs on one rank, got world size {comm.world_size()}")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def build_reference(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, object]:
    """(megatron GPTModel in eval mode with the checkpoint loaded, Source)."""
    from sift_megatron.convert.source import load_source, single_rank_config

    src = load_source(run_dir)
    _ensure_single_rank()
    from megatron.core import tensor_parallel

    from sift_megatron.models.gpt import build_model
    from sift_megatron.sharding import global_param_names
    from sift_megatron.sparse.layers import sparse_modules

    cfg = single_rank_config(src.cfg)
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    (model,) = build_model(cfg, src.padded_vocab_size, src.shape)  # the shapes it was saved with
    with torch.no_grad():
        params = dict(global_param_names(model))
        if set(params) != {k for k in src.tensors if not k.endswith(".mask")}:
            missing = sorted(set(params) - set(src.tensors))
            raise SiftError(f"{src.path}: the megatron model and model.safetensors differ (e.g. {missing[:1]})")
        for name, p in params.items():
            p.copy_(src.tensors[name])
        for name, m in sparse_modules(model):
            key = name[: -len("weight")] + "mask"
            m.mask.copy_(src.tensors[key].bool() if key in src.tensors else torch.ones_like(m.mask))
    model.eval()
    return model, src


@torch.no_grad()
def megatron_logits(run_dir: str | os.PathLike, tokens: torch.Tensor | list, model=None) -> torch.Tensor:
    """Logits [batch, seq, padded_vocab] (float32) of megatron's forward on `tokens` [batch, seq] (or one list
    of ids), positions 0..seq-1, causal mask; pass `model` (from build_reference) to reuse a built model."""
    if model is None:
        model, src = build_reference(run_dir)
        max_pos = src.max_positions
    else:
        max_pos = model.max_sequence_length
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    b, s = tokens.shape
    if s > max_pos:
        raise SiftError(f"{s} tokens exceed the model's {max_pos} positions")
    pos = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked
    out = model(tokens, pos, mask, labels=None)
    if out.shape[:2] != (b, s):  # megatron returns [b, s, v]; guard against a layout change on upgrade
        raise RuntimeError(f"unexpected megatron logits shape {tuple(out.shape)} for tokens {b}x{s}")
    return out.float()


def main(argv: list[str] | None = None) -> int:
    """`python -m sift_megatron.convert.reference OUT.safetensors RUN_DIR=TOKENS.json ...`: logits of every
    run for every token list of its JSON file ([[ids], ...]), saved as `<run name>.<i>` [seq, padded_vocab]."""
    ap = argparse.ArgumentParser(prog="python -m sift_megatron.convert.reference")
    ap.add_argument("out")
    ap.add_argument("jobs", nargs="+", metavar="RUN_DIR=TOKENS_JSON")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    result = {}
    for job in args.jobs:
        run_dir, tok_file = job.rsplit("=", 1)
        model, _ = build_reference(run_dir)
        for i, ids in enumerate(json.loads(Path(tok_file).read_text())):
            result[f"{Path(run_dir).name}.{i}"] = megatron_logits(run_dir, ids, model=model)[0].contiguous()
    save_file(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
