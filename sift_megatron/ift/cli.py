"""`sift flops CONFIG [a.b=c ...] [--json] [--seq N]`: forward FLOPs per token and parameters, dense baseline
vs the Sparse-IFT model. `sift plan CONFIG --gpus N [--gpu-mem GB] [--json]`: memory per GPU and a layout.
No torch: both are arithmetic on the config and answer instantly."""

from __future__ import annotations

import argparse
import json

from sift_megatron.errors import SiftError


def _flops_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=int, default=None, help="sequence length for attention (default model.seq_length)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: model.vocab_size, the "
                   "tokenizer's, or GPT-2's 50257)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (required)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB (2^30 bytes), default 80")
    p.add_argument("--precision", choices=("config", "fp32", "bf16"), default="config",
                   help="training precision (default: from the config; fp32 unless DeepSpeed bf16 is enabled)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (as for sift flops)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--fs-gbps", type=float, default=5.0, help="scale model: aggregate filesystem write GB/s "
                   "(default 5)")
    p.add_argument("--client-gbps", type=float, default=2.0, help="scale model: write GB/s of one process "
                   "(default 2)")
    p.add_argument("--net-gbps", type=float, default=25.0, help="scale model: inter-node GB/s per GPU, for DP "
                   "collectives (default 25)")
    p.add_argument("--tp-gbps", type=float, default=150.0, help="scale model: intra-node GB/s per GPU, for TP "
                   "collectives (default 150)")
    p.add_argument("--tflops", type=float, default=150.0, help="scale model: achieved TFLOP/s per GPU, for the "
                   "step time (default 150)")


def register(sub: argparse._SubParsersAction) -> None:
    _command(sub, "flops", _flops, _flops_options,
             help="forward FLOPs/token and parameters: dense baseline vs the Sparse-IFT model",
             usage="sift flops CONFIG [a.b=c ...] [--seq N] [--vocab V] [--json]",
             config_help="YAML config (e.g. configs/gpt3/125m/sparse_wide_s50_static.yaml)")
    _command(sub, "plan", _plan, _plan_options,
             help="parameters, FLOPs, memory per GPU and a TP x PP x DP layout that fits",
             usage="sift plan CONFIG [a.b=c ...] --gpus N [--gpu-mem GB] [--precision P] [--json] "
                   "[--fs-gbps X --client-gbps X --net-gbps X --tp-gbps X --tflops X]",
             config_help="YAML config")


def _command(sub: argparse._SubParsersAction, name: str, func, options, *, help: str, usage: str,
             config_help: str) -> None:
    """CONFIG, the command's options, then overrides (options may also come among them: see _reparse)."""
    p = sub.add_parser(name, help=help, usage=usage)
    p.add_argument("config", help=config_help)
    options(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="a.b=c", help="config overrides")
    p.set_defaults(func=func, _options=options)


def _reparse(args: argparse.Namespace) -> argparse.Namespace:
    """Options may follow CONFIG among the overrides (`sift plan c.yaml --gpus 8 parallel.tensor=2`), which
    argparse's positional matching cannot do: everything after CONFIG arrives in `rest` and is parsed
    here, intermixed; an option given before CONFIG counts unless repeated after it."""
    inner = argparse.ArgumentParser(prog=f"sift {args.command}")
    args._options(inner)
    inner.add_argument("overrides", nargs="*")
    ns = inner.parse_intermixed_args(args.rest)
    for key, value in vars(ns).items():
        if key != "overrides" and value == inner.get_default(key):
            setattr(ns, key, getattr(args, key))
    ns.config, ns.command = args.config, args.command
    return ns


def _fmt(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}"
    return f"{x:.0f}"


def format_flops(rep: dict, name: str = "") -> str:
    """The `sift flops` table: dense baseline vs transformed per layer type, totals and both ratios."""
    b, t, r = rep["baseline"], rep["transformed"], rep["ratio"]
    sb, st = rep["shape"]["baseline"], rep["shape"]["transformed"]
    L = rep["num_layers"]
    used = st["sparsity"]
    lines = [
        f"sift flops {name}: family {rep['family']} s={rep['s']:g} (sparsity used {used:.4f}), "
        + (f"{rep['pattern']} masks, " if rep["pattern"] != "unstructured" else "") + f"{L} layers, "
        f"seq {rep['seq_length']}, vocab {rep['vocab_size']} (padded {rep['padded_vocab_size']}; "
        f"{rep['vocab_source']})",
        f"shape: hidden {sb['hidden_size']} -> {st['hidden_size']}, heads {sb['num_attention_heads']} -> "
        f"{st['num_attention_heads']} (head dim {sb['head_dim']} -> {st['head_dim']}), ffn {sb['ffn_hidden_size']} "
        f"-> {st['ffn_hidden_size']}"
        + (f", branches {st['branches']} (fc1's carry the activation; QKV / proj / fc2's: {st['branch_activation']})"
           if rep["family"] == "parallel" else "")
        + (f", inner {st['inner']}" if st["inner"] else "")
        + (f", exact-iso sparsity {st['exact_iso_sparsity']:.4f}" if st["exact_iso_sparsity"] is not None else ""),
    ]
    if "paper" in rep["shape"]:
        lines.append(_widths_line(rep))
    lines += ["", f"{'forward FLOPs per token':<36}{'dense baseline':>16}{'transformed':>16}{'ratio':>9}"]

    def row(label: str, x: float, y: float) -> None:
        lines.append(f"{label:<36}{_fmt(x):>16}{_fmt(y):>16}{(y / x if x else float('nan')):>9.4f}")

    for name_ in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
        row(f"  {name_} (one layer)", b["per_layer"][name_], t["per_layer"][name_])
    row(f"  transformed layers (x{L})", b["transformed_layers"], t["transformed_layers"])
    row(f"  attention QK^T + AV (x{L})", b["attention"], t["attention"])
    row("  LM head", b["lm_head"], t["lm_head"])
    row("  total", b["total"], t["total"])
    row("  executed (masked zeros computed)", b["total"], t["executed"]["total"])
    if rep["pattern"] != "unstructured":
        row(f"  {rep['pattern']} kernel executes", b["total"], t["kernel"]["total"])
    row("  elementwise (approx., not in total)", b["elementwise"], t["elementwise"])
    row(f"  training fwd+bwd ({t['training']['algorithm']})", b["training"]["per_token"], t["training"]["per_token"])
    lines.append("")
    lines.append(f"{'parameters (stored / active)':<36}{'dense baseline':>16}{'transformed':>26}")
    pb, pt = rep["params"]["baseline"], rep["params"]["transformed"]
    for group in pb["groups"]:
        gb, gt = pb["groups"][group], pt["groups"][group]
        lines.append(f"  {group:<34}{_fmt(gb['stored']):>16}{_fmt(gt['stored']) + ' / ' + _fmt(gt['active']):>26}")
    lines.append(f"  {'total':<34}{_fmt(pb['stored']):>16}{_fmt(pt['stored']) + ' / ' + _fmt(pt['active']):>26}")
    lines.append("")
    lines.append(f"transformed-layer FLOP ratio {r['transformed_layers']:.4f} (iso-FLOP target 1.00); "
                 f"whole-model FLOP ratio {r['total']:.4f}; executed / dense {r['executed_total']:.4f}"
                 + (f"; {rep['pattern']} kernel / dense {r['kernel_total']:.4f}" if rep["pattern"] != "unstructured"
                    else ""))
    if "paper" in rep:
        pr = rep["paper"]["ratio"]
        lines.append(f"paper widths: transformed-layer FLOP ratio {pr['transformed_layers']:.4f}; whole-model "
                     f"FLOP ratio {pr['total']:.4f}; executed / dense {pr['executed_total']:.4f}")
    return "\n".join(lines)


def _widths_line(rep: dict) -> str:
    """Paper widths -> the aligned widths the model is built with, and the sparsity each uses."""
    p, a = rep["shape"]["paper"], rep["shape"]["transformed"]
    parts = [f"{label} {p[k]} -> {a[k]}" for label, k in (("hidden", "hidden_size"), ("head dim", "head_dim"),
                                                          ("ffn", "ffn_hidden_size"))]
    if a["inner"]:
        parts.append("inner " + ", ".join(f"{k.removeprefix('linear_')} {p['inner'][k]} -> {v}"
                                          for k, v in a["inner"].items()))
    if rep["family"] == "parallel":
        parts.append("Sparse Parallel keeps the dense widths")
    return (f"widths: paper -> aligned (sparsity.align {rep['align']}): " + ", ".join(parts)
            + f", sparsity used {p['sparsity']:.4f} -> {a['sparsity']:.4f}")


def _flops(args: argparse.Namespace) -> int:
    from sift_megatron.config import load_config
    from sift_megatron.ift.flops import flop_report

    args = _reparse(args)
    cfg = load_config(args.config, args.overrides)
    rep = flop_report(cfg, seq=args.seq, vocab_size=args.vocab)
    print(json.dumps(rep, indent=2) if args.json else format_flops(rep, args.config))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sift_megatron.config import load_config
    from sift_megatron.ift.plan import format_plan, plan_report

    args = _reparse(args)
    if args.gpus is None:
        raise SiftError("--gpus N is required")
    cfg = load_config(args.config, args.overrides)
    for opt in ("fs_gbps", "client_gbps", "net_gbps", "tp_gbps", "tflops"):
        if getattr(args, opt) <= 0:
            raise SiftError(f"--{opt.replace('_', '-')} must be > 0, got {getattr(args, opt)}")
    rep = plan_report(cfg, args.gpus, args.gpu_mem, None if args.precision == "config" else args.precision,
                      vocab_size=args.vocab, scale={"fs_gbps": args.fs_gbps, "client_gbps": args.client_gbps,
                                                    "net_gbps": args.net_gbps, "tp_gbps": args.tp_gbps,
                                                    "tflops": args.tflops})
    print(json.dumps(rep, indent=2) if args.json else format_plan(rep, args.config))
    return 0
