"""Step time of the tiny config: our DeepSpeed-driven step vs a plain megatron-core step of the same model.

Usage: python benchmarks/step_time.py [--steps N] [--config configs/tiny/dense.yaml] [a.b=c ...]
Runs TP=1 (1 process) and TP=2 (2 processes, torchrun) and prints tokens/s for each, then the ratio
ds_step / mcore_step (goal <= 1.10). The plain step is forward/backward over the same micro-batches,
torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW: what megatron-core gives without DeepSpeed.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, launch, timed  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch

    from sift_megatron.config import load_config
    from sift_megatron.training import data as D
    from sift_megatron.training.trainer import Trainer

    cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps * 3}", "logging.progress=false",
                                    f"train.out_dir={args.out}", "train.overwrite=true"])
    tr = Trainer(cfg)
    it = D.micro_batches(tr.datasets.train, cfg, tr.dp_rank, tr.dp_size, 0, tr.plat.device)

    ds = timed(lambda: tr.train_step(it), args.steps, args.warmup)

    # plain megatron-core: same model chunks, same micro-batches, torch AdamW, no DeepSpeed
    from sift_megatron.models.gpt import build_model
    from sift_megatron.training.engine import param_groups

    model = build_model(cfg, tr.vocab)[0]
    o = cfg.optimizer
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(tr.accum):
            mb = next(it)
            out = model(mb["tokens"], mb["position_ids"], tr.attn_mask, labels=mb["labels"])
            loss = tr._loss(mb["loss_mask"], out) / tr.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()

    plain = timed(plain_step, args.steps, args.warmup)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    emit({"tp": cfg.parallel.tensor, "ds_step_s": ds, "mcore_step_s": plain, "tokens_per_s": tokens / ds})
    tr.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny" / "dense.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2):
            r = launch(__file__, tp, ["--config", args.config, "--steps", str(args.steps), "--warmup",
                                      str(args.warmup), "--out", f"{tmp}/tp{tp}", *args.overrides,
                                      f"parallel.tensor={tp}"], port=29700 + tp)
            results[tp] = r
            print(f"TP={tp}: {r['tokens_per_s']:.0f} tokens/s  DeepSpeed step {1e3 * r['ds_step_s']:.1f} ms  "
                  f"plain megatron-core step {1e3 * r['mcore_step_s']:.1f} ms  "
                  f"ratio {r['ds_step_s'] / r['mcore_step_s']:.3f}")
    summary = {
        "ds_step_over_mcore_step": results[1]["ds_step_s"] / results[1]["mcore_step_s"],
        "ds_step_over_mcore_step_tp2": results[2]["ds_step_s"] / results[2]["mcore_step_s"],
        "tokens_per_s_tp1": results[1]["tokens_per_s"],
        "tokens_per_s_tp2": results[2]["tokens_per_s"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
