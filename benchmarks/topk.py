"""Exact top-k (sparse/topk.py) in one process vs torch.topk, on Sparse Wide s=0.75 GPT-3 Small shapes.

Usage: python benchmarks/topk.py [--tensors 12] [--rows 1536] [--cols 6144] [--density 0.25] [--repeats 3]
                                [--threads N] [--device cpu|cuda]
Times, over all tensors together (median of repeats):
  - topk_mask(|w|, magnitude=True): one batched call, k = density * numel per tensor (the RigL drop);
  - torch.topk(|w|, k, sorted=False) per tensor, plus building the bool mask from its indices;
  - init: hash_scores + topk_mask_keys (random exact-count mask init);
  - a full RigL update (drop + grow, batched) over the same tensors.
Ratio topk_mask / torch.topk (goal <= 1: "competitive"). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sift_megatron.dst.algorithms import rigl_update  # noqa: E402
from sift_megatron.sparse.masks import hash_scores, nnz_for  # noqa: E402
from sift_megatron.sparse.topk import topk_mask, topk_mask_keys  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=12)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=6144)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.rows, args.cols)
    numel = args.rows * args.cols
    k = nnz_for(numel, args.density)
    weights = [torch.randn(shape, generator=g, device=args.device) * 0.02 for _ in range(args.tensors)]
    grads = [torch.randn(shape, generator=g, device=args.device) for _ in range(args.tensors)]
    index = [torch.arange(numel, device=args.device) for _ in range(args.tensors)]
    ks = [k] * args.tensors

    def ours():
        return topk_mask(weights, None, ks, magnitude=True)

    def reference():
        out = []
        for w in weights:
            m = torch.zeros(numel, dtype=torch.bool, device=w.device)
            m[torch.topk(w.abs().reshape(-1), k, sorted=False).indices] = True
            out.append(m.view(shape))
        return out

    def init():
        keys = [hash_scores(0, f"layer{i}.weight", idx) for i, idx in enumerate(index)]
        return topk_mask_keys(keys, ks)

    masks = [m.view(shape) for m in init()]

    def rigl():
        return rigl_update(weights, masks, grads, 0.3, global_index=index)

    got, ref = ours(), reference()
    # torch.topk picks arbitrary elements among ties; Gaussian weights have (almost) none, so compare counts
    # and agreement.
    agree = sum(int((a & b).sum()) for a, b in zip(got, ref)) / (k * args.tensors)
    t_ours = timed(ours, args.repeats)
    t_ref = timed(reference, args.repeats)
    t_init = timed(init, args.repeats)
    t_rigl = timed(rigl, args.repeats)
    print(f"device {args.device}, {args.tensors} x {shape}, k = {k} per tensor ({args.density:.2f}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"topk_mask (batched, exact)     {t_ours * 1e3:9.1f} ms")
    print(f"torch.topk + mask per tensor   {t_ref * 1e3:9.1f} ms")
    print(f"ratio topk_mask / torch.topk   {t_ours / t_ref:9.3f}   (agreement {agree:.6f})")
    print(f"mask init (hash + top-k keys)  {t_init * 1e3:9.1f} ms")
    print(f"RigL update (drop + grow)      {t_rigl * 1e3:9.1f} ms")
    print(json.dumps({"topk_mask_s": round(t_ours, 4), "torch_topk_s": round(t_ref, 4),
                      "topk_over_torch_topk": round(t_ours / t_ref, 3), "mask_init_s": round(t_init, 4),
                      "rigl_update_s": round(t_rigl, 4), "tensors": args.tensors, "shape": list(shape),
                      "density": args.density, "device": args.device, "agreement": round(agree, 6)}))


if __name__ == "__main__":
    main()
