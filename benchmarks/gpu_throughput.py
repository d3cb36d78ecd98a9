"""GPU throughput in one process on one GPU, every figure from the same run.

Our dense GPT-3 125M step (megatron-core + DeepSpeed ZeRO-1, bf16, SDPA attention, mock data) against a Hugging
Face GPT2LMHeadModel of the same shape (SDPA, bf16 autocast, fused AdamW, torch.compile), then Sparse Wide
s=0.5 and s=0.75 (RigL masks, aligned widths) against our dense step, beside their executed-FLOP ratios (a masked
dense GEMM executes every masked zero: the time ratio should not exceed it). MFU against the device's bf16 peak.
Then Sparse Wide s=0.75 with block masks (sparsity.pattern=block, --block 64) computed as masked dense
(sw75_block_masked_over_dense) and by the block-sparse kernels (sparsity.kernel=block: sw75_block_over_dense,
issue 19's goal <= 1.5).

Usage: python benchmarks/gpu_throughput.py [--steps 10] [--warmup 3] [--micro-batch 16] [--seq 2048]
CPU smoke test of the script itself: --layers 2 --hidden 64 --heads 4 --seq 64 --micro-batch 2 --vocab 256
--no-compile --align 8 --block 16 (on CPU kernel=block runs the torch reference). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int) -> float:
    """Median seconds per call after `warmup` calls."""
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(args, out: Path, name: str, overrides: list[str]) -> dict:
    """Median step time of `sift train`'s step for the shape plus `overrides`, with FLOPs and MFU."""
    import torch

    from sift_megatron.config import load_config
    from sift_megatron.training import data as D
    from sift_megatron.training.throughput import Throughput
    from sift_megatron.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}", f"model.seq_length={args.seq}", "model.precision=bf16",
        f"model.attention={args.attention}", "zero.stage=1", "zero.stage0_when_single_replica=false",
        "data.mock=true", f"data.mock_vocab_size={args.vocab}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}", f"train.steps={args.steps + args.warmup + 1}",
        "train.save=false", "logging.progress=false", "logging.tensorboard=false", f"train.out_dir={out / name}",
        *overrides])
    tr = Trainer(cfg)
    it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
    step = [0]

    def one() -> None:
        step[0] += 1
        if tr.dst:
            tr.dst.before_step(step[0])
        tr.train_step(it)
        if tr.dst:
            tr.dst.after_step(step[0])

    if tr.plat.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    dt = timed(one, args.steps, args.warmup)
    tp = Throughput(cfg, tr.datasets.vocab_size, 1, tr.plat.device)
    rec = tp.record(dt)
    rec.update(step_s=dt, hidden=tr.shape.hidden_size, sparsity=tr.shape.sparsity,
               useful_flops_per_token=tp.useful, executed_flops_per_token=tp.executed)
    tr.close(destroy_process_group=False)
    print(f"[gpu_throughput] {name}: {1e3 * dt:.1f} ms/step, {rec['tokens_per_s']:.0f} tokens/s, "
          f"hidden {rec['hidden']}, s {rec['sparsity']:.4f}" + (f", MFU {rec['mfu']:.1%}" if "mfu" in rec else ""),
          flush=True)
    return rec


def hf_gpt2(args, compile_model: bool) -> float:
    """Median step time of a plain Hugging Face GPT-2 training step of the same shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    padded = -(-args.vocab // 128) * 128  # the same padded vocabulary our model computes
    conf = GPT2Config(vocab_size=padded, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                      n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      attn_implementation="sdpa")
    model = GPT2LMHeadModel(conf).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, args.steps, args.warmup + (2 if compile_model else 0))
    print(f"[gpu_throughput] hf_gpt2{'_compile' if compile_model else ''}: {1e3 * dt:.1f} ms/step", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--align", type=int, default=64, help="sparsity.align of the Sparse Wide runs")
    ap.add_argument("--block", type=int, default=64, help="sparsity.block of the block-mask Sparse Wide runs")
    ap.add_argument("--attention", default="sdpa", help="model.attention of our runs")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (CPU smoke test)")
    args = ap.parse_args()

    import torch

    from sift_megatron import platform

    platform.setup()
    tokens = args.micro_batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dense = ours(args, out, "dense", [])
        rigl = ["dst.algorithm=rigl", f"dst.interval={max(1, args.steps // 2)}", "dst.end=1000000"]
        sparse = {s: ours(args, out, f"sw{int(100 * s)}", [
            "sparsity.family=wide", f"sparsity.s={s}", f"sparsity.align={args.align}", *rigl]) for s in (0.5, 0.75)}
        blocks = {kernel: ours(args, out, f"sw75_block{args.block}_{kernel}", [
            "sparsity.family=wide", "sparsity.s=0.75", f"sparsity.align={args.align}", "sparsity.pattern=block",
            f"sparsity.block={args.block}", f"sparsity.kernel={kernel}", *rigl]) for kernel in ("masked", "block")}
    hf_eager = hf_gpt2(args, compile_model=False)
    hf = hf_eager if args.no_compile else hf_gpt2(args, compile_model=True)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shape": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "seq": args.seq,
                  "micro_batch": args.micro_batch, "vocab": args.vocab, "precision": "bf16"},
        "dense_tokens_per_s": dense["tokens_per_s"],
        "hf_gpt2_eager_tokens_per_s": tokens / hf_eager,
        "hf_gpt2_compile_tokens_per_s": None if args.no_compile else tokens / hf,
        "dense_over_hf_compile": None if args.no_compile else hf / dense["step_s"],
        "dense_over_hf_eager": hf_eager / dense["step_s"],
        "dense_mfu": dense.get("mfu"),
        "dense_peak_gpu_mem_gib": dense.get("peak_gpu_mem_gib"),
    }
    for s, r in sparse.items():
        tag = f"sw{int(100 * s)}"
        result[f"{tag}_over_dense"] = r["step_s"] / dense["step_s"]
        result[f"{tag}_executed_flops_over_dense"] = r["executed_flops_per_token"] / dense["executed_flops_per_token"]
        result[f"{tag}_hidden"] = r["hidden"]
        result[f"{tag}_sparsity"] = r["sparsity"]
        result[f"{tag}_mfu"] = r.get("mfu")
        result[f"{tag}_executed_mfu"] = r.get("executed_mfu")
    from sift_megatron.sparse.block_linear import have_triton

    result["sw75_block"] = args.block
    result["sw75_block_impl"] = "triton" if torch.cuda.is_available() and have_triton() else "torch reference"
    result["sw75_block_masked_over_dense"] = blocks["masked"]["step_s"] / dense["step_s"]
    result["sw75_block_over_dense"] = blocks["block"]["step_s"] / dense["step_s"]
    result["sw75_block_over_masked"] = blocks["block"]["step_s"] / blocks["masked"]["step_s"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
