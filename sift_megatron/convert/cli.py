"""`sift convert CHECKPOINT --to hf --out DIR` and `sift eval HF_DIR --tasks T1,T2`.

Nothing heavy is imported here (torch, transformers, lm-eval load inside the handlers), so `sift --help`
stays instant.
"""

from __future__ import annotations

import argparse

from sift_megatron.errors import positive_int

TARGETS = ("hf",)

EVAL_EPILOG = """\
tasks:
  sift_offline_mc   bundled: 20 Shakespeare next-line multiple-choice items, runs offline
  any lm-eval-harness task name (needs the task's dataset from the Hugging Face hub, i.e. network), e.g.
  the Open LLM Leaderboard (v1) set, each with its own few-shot count:
    arc_challenge   --num-fewshot 25   (ARC-Challenge, acc_norm)
    hellaswag       --num-fewshot 10   (HellaSwag, acc_norm)
    mmlu            --num-fewshot 5    (MMLU, 57 subjects, acc)
    truthfulqa_mc2  --num-fewshot 0    (TruthfulQA MC2, acc)
    winogrande      --num-fewshot 5    (Winogrande, acc)
example:
  sift convert runs/gpt3-small --to hf --out exports/gpt3-small
  sift eval exports/gpt3-small --tasks sift_offline_mc --output results.json
  sift eval exports/gpt3-small --tasks hellaswag --num-fewshot 10 --batch-size 16
"""


def _batch_size(text: str) -> int | str:
    return text if text == "auto" or text.startswith("auto:") else positive_int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` and `eval` to the `sift` parser."""
    c = subparsers.add_parser(
        "convert", help="export a checkpoint as a Hugging Face transformers model",
        description="Export a `sift train` run or checkpoint (config.yaml + model.safetensors) as a transformers "
                    "model directory: safetensors weights, config, generation config, tokenizer and "
                    "sparsity_stats.json. dense/wide/doped -> GPT2LMHeadModel (doped: W_s + V U folded), "
                    "parallel/factorized -> SiftGPTForCausalLM (registered with the Auto classes when "
                    "sift_megatron.convert is imported; trust_remote_code=True works without it).")
    c.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory or checkpoint directory (or a checkpoints root with a `latest` pointer)")
    c.add_argument("--to", default="hf", metavar="FORMAT", help="target format: hf (default)")
    c.add_argument("--out", required=True, metavar="DIR", help="output directory (created, or replaced if it is "
                                                              "an earlier export)")
    c.add_argument("--tokenizer", metavar="DIR|NAME",
                   help="the tokenizer the run's data was made with, if the one named in config.yaml moved or "
                        "none is named (any value data.tokenizer accepts)")
    c.set_defaults(func=_convert)

    e = subparsers.add_parser(
        "eval", help="run lm-evaluation-harness on an exported model",
        description="Evaluate a `sift convert` export with lm-evaluation-harness (HF backend, float32).",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("hf_dir", metavar="HF_DIR", help="directory written by `sift convert --to hf`")
    e.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated task names")
    e.add_argument("--limit", type=positive_int, metavar="N", help="evaluate only the first N items of each task")
    e.add_argument("--batch-size", type=_batch_size, default=1, metavar="N", help="batch size, or auto (default 1)")
    e.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
    e.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    e.add_argument("--output", metavar="JSON", help="write results and per-item log-likelihoods here")
    e.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and the harness (default 1234)")
    e.set_defaults(func=_eval)


def _convert(args: argparse.Namespace) -> int:
    from sift_megatron.errors import SiftError

    if args.to not in TARGETS:
        raise SiftError(f"unknown target format '{args.to}' (supported: {', '.join(TARGETS)})")
    from sift_megatron.convert.hf import export_hf

    out = export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer)
    import json

    stats = json.loads((out / "sparsity_stats.json").read_text())
    t = stats["total"]
    sparse = (f", {t['sparse_tensors']} sparse tensors at density {t['density']:.3f}" if t["sparse_tensors"]
              else "")
    tok = "with tokenizer" if (out / "tokenizer.json").is_file() else "no tokenizer (mock-data run)"
    print(f"convert: {stats['family']} model (step {stats['step']}) -> {out} as {stats['architecture']}, "
          f"{tok}{sparse}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sift_megatron.convert.lmeval import results_table, run_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_eval(args.hf_dir, tasks, limit=args.limit, batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot, device=args.device, output=args.output, seed=args.seed)
    if results:
        print(results_table(results))
        if args.output:
            print(f"eval: results and per-item log-likelihoods written to {args.output}")
    return 0
