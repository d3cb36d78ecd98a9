"""Cost of sparsity machinery: a Sparse Wide s=0.75 model vs a dense model of the same widened shapes, and the
mask initialisation at GPT-3 125M Sparse Wide scale.

Usage: python benchmarks/sparse_overhead.py [--hidden 128] [--layers 4] [--steps 20]
Goal: sparse step / dense step <= 1.03 (masks cost one in-place multiply of each accumulated weight gradient
per micro-batch backward, no extra work in forward). Both models live in one process and their steps alternate
(order swapped every repetition), so load from other processes hits both alike. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, launch  # noqa: E402


def interleaved(fns: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each fn per repetition, the fns run alternately (order reversed every other repetition)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def worker(args: argparse.Namespace) -> None:
    from sift_megatron.config import load_config
    from sift_megatron.ift.sizes import transformed_shape
    from sift_megatron.training import data as D
    from sift_megatron.training.trainer import Trainer

    base = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=4",
            "model.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8",
            f"train.steps={args.steps * 4}", "logging.progress=false", "train.save=false"]
    sparse_cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml",
                             [*base, "sparsity.family=wide", "sparsity.s=0.75", f"train.out_dir={args.out}/sparse", "train.overwrite=true"])
    shape = transformed_shape(sparse_cfg)
    dense_cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
        *base, f"model.hidden_size={shape.hidden_size}", f"model.ffn_hidden_size={shape.ffn_hidden_size}",
        f"model.num_attention_heads={shape.num_attention_heads}", f"train.out_dir={args.out}/dense", "train.overwrite=true"])
    from megatron.core import parallel_state as ps

    trainers, steps = [], {}
    for name, cfg in (("dense", dense_cfg), ("sparse", sparse_cfg)):
        if ps.model_parallel_is_initialized():  # one process, TP=PP=1: the second init builds equal groups
            ps.destroy_model_parallel()
        tr = Trainer(cfg)
        it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
        trainers.append(tr)
        steps[name] = lambda tr=tr, it=it: tr.train_step(it)
    shapes = [[tuple(q.shape) for q in tr.params] for tr in trainers]
    assert shapes[0] == shapes[1], "the dense baseline must have the sparse model's (widened) parameter shapes"
    times = interleaved(steps, args.steps, 3)
    res = {k: statistics.median(v) for k, v in times.items()}
    pair = statistics.median([s / d for s, d in zip(times["sparse"], times["dense"])])
    trainers[-1].close(destroy_process_group=False)

    # Mask init at 125M Sparse Wide scale (s=0.5: hidden 1092, 12 layers, 171.7M sparse weights).
    import torch

    from sift_megatron.models.gpt import build_model
    from sift_megatron.sparse.layers import init_model_masks

    big = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
        "model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_length=1024",
        "sparsity.family=wide", "sparsity.s=0.5", "model.layout_invariant_init=false"])
    ps.initialize_model_parallel(1, 1)
    chunks = build_model(big, 50304)
    t0 = time.perf_counter()
    dens = init_model_masks(chunks, 1234, transformed_shape(big).sparsity)
    mask_init = time.perf_counter() - t0
    n = sum(m.numel() for c in chunks for m in c.buffers() if m.dtype == torch.bool)
    emit({"dense_step_s": res["dense"], "sparse_step_s": res["sparse"],
          "sparse_step_over_dense": res["sparse"] / res["dense"], "median_pair_ratio": pair,
          "hidden": shape.hidden_size,
          "mask_init_125m_s": mask_init, "mask_init_elements": n, "mask_tensors": len(dens)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        r = launch(__file__, 1, ["--hidden", str(args.hidden), "--layers", str(args.layers), "--steps",
                                 str(args.steps), "--out", tmp], port=29731)
    print(f"Sparse Wide s=0.75 (hidden {r['hidden']}): sparse step {1e3 * r['sparse_step_s']:.1f} ms, dense step of "
          f"the same shapes {1e3 * r['dense_step_s']:.1f} ms, ratio {r['sparse_step_over_dense']:.3f} (median of "
          f"per-repetition ratios {r['median_pair_ratio']:.3f})")
    print(f"mask init, GPT-3 125M Sparse Wide s=0.5 ({r['mask_init_elements'] / 1e6:.1f}M elements in "
          f"{r['mask_tensors']} tensors): {r['mask_init_125m_s']:.2f} s")
    print(__import__("json").dumps({k: r[k] for k in ("sparse_step_over_dense", "median_pair_ratio", "dense_step_s",
                                                      "sparse_step_s", "mask_init_125m_s", "mask_init_elements")}))


if __name__ == "__main__":
    main()
