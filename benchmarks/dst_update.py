"""Cost of one RigL update (all layers: DP-averaged dense gradients, TP-global drop/grow top-k, ZeRO state
surgery) relative to one training step, for a Sparse Wide s=0.75 GPT (6 layers x 512 hidden after widening),
at TP=1 and TP=2; plus the distributed top-k vs torch.topk on the gathered tensor.

Usage: python benchmarks/dst_update.py [--layers 6] [--hidden 256]
Goal: rigl_update / step <= 1.0 (then DST costs < 1 % of training at interval 100). Last line: JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, launch, timed  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sift_megatron.config import load_config
    from sift_megatron.sparse.topk import topk_mask
    from sift_megatron.training import data as D
    from sift_megatron.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=8",
        "model.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=1000",
        "sparsity.family=wide", "sparsity.s=0.75", "dst.algorithm=rigl", "dst.interval=1", "dst.end=1000",
        f"parallel.tensor={args.tp}", "logging.progress=false", "train.save=false", f"train.out_dir={args.out}", "train.overwrite=true"])
    tr = Trainer(cfg)
    it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)
    state = {"step": 0}

    def step_with_capture():
        state["step"] += 1
        tr.dst.before_step(state["step"])
        tr.train_step(it)

    def plain_step():
        tr.dst.before_step(10**9)  # not an update step: no capture
        tr.train_step(it)

    step_s = timed(plain_step, args.steps, 2)
    updates = []
    for _ in range(args.steps):
        step_with_capture()
        updates.append(timed(lambda: tr.dst.after_step(state["step"]), 1, 0))
    update_s = sorted(updates)[len(updates) // 2]

    # distributed top-k (this rank's shards, TP group) vs torch.topk on the gathered logical tensors
    mods = tr.dst.mods
    vals = [m.weight.detach().abs().reshape(-1) for _, m in mods]
    idx = [m.global_index() for _, m in mods]
    # k must be the same on every rank: a fraction of the logical tensor (here: keep half of its 25 % density)
    ks = [m.weight.numel() * ps.get_tensor_model_parallel_world_size() // 8 for _, m in mods]
    group = ps.get_tensor_model_parallel_group() if args.tp > 1 else None
    ours = timed(lambda: topk_mask(vals, idx, ks, group=group), 5, 1)
    full = []
    for v in vals:
        parts = [torch.empty_like(v) for _ in range(args.tp)]
        if args.tp > 1:
            dist.all_gather(parts, v, group=ps.get_tensor_model_parallel_group())
        else:
            parts = [v]
        full.append(torch.cat(parts))
    ref = timed(lambda: [torch.topk(f, k) for f, k in zip(full, ks)], 5, 1)
    n = sum(f.numel() for f in full)
    emit({"tp": args.tp, "step_s": step_s, "rigl_update_s": update_s, "rigl_update_over_step": update_s / step_s,
          "topk_ours_s": ours, "topk_torch_gathered_s": ref, "elements": n, "tensors": len(full)})
    tr.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256, help="base hidden; Sparse Wide s=0.75 doubles it")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2):
            res[tp] = launch(__file__, tp, ["--layers", str(args.layers), "--hidden", str(args.hidden), "--steps",
                                            str(args.steps), "--tp", str(tp), "--out", f"{tmp}/tp{tp}"],
                             port=29741 + tp)
            r = res[tp]
            print(f"TP={tp}: step {1e3 * r['step_s']:.0f} ms, RigL update {1e3 * r['rigl_update_s']:.0f} ms "
                  f"(ratio {r['rigl_update_over_step']:.3f}); top-k over {r['elements'] / 1e6:.1f}M elements in "
                  f"{r['tensors']} tensors: ours {1e3 * r['topk_ours_s']:.0f} ms, torch.topk on gathered "
                  f"{1e3 * r['topk_torch_gathered_s']:.0f} ms")
    print(__import__("json").dumps({
        "rigl_update_over_step_tp1": res[1]["rigl_update_over_step"],
        "rigl_update_over_step_tp2": res[2]["rigl_update_over_step"],
        "topk_ours_over_torch_tp1": res[1]["topk_ours_s"] / res[1]["topk_torch_gathered_s"],
        "topk_ours_over_torch_tp2": res[2]["topk_ours_s"] / res[2]["topk_torch_gathered_s"]}))


if __name__ == "__main__":
    main()
