"""Dense vs all four Sparse-IFT families at s in {0.5, 0.75}, static and RigL masks, on the same tokens; writes
docs/RESULTS.md with the measured numbers and the exact command, whatever they show.

Usage: python benchmarks/reproduce.py [--steps 300] [--nproc 2] [--corpus-size 6MB] [--out runs/reproduce]
       [--config configs/tiny/quickstart.yaml] [--results docs/RESULTS.md] [a.b=c ...]
Reuses the quickstart's tokenizer/shards and training driver (sift_megatron/quickstart.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def runs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"dense": []}
    for fam in ("wide", "parallel", "factorized", "doped"):
        for s in (0.5, 0.75):
            for algo in ("static", "rigl"):
                extra = ["sparsity.exact_iso=true"] if fam == "wide" else []
                dst = ["dst.algorithm=rigl", "dst.interval=25", "dst.end=0.75"] if algo == "rigl" else []
                out[f"{fam}_s{int(s * 100)}_{algo}"] = [f"sparsity.family={fam}", f"sparsity.s={s}", *extra, *dst]
    return out


def portable_args(argv: list[str]) -> list[str]:
    """The arguments as RESULTS.md records them: paths inside the repository relative to it, any other
    absolute path as a placeholder (<out dir>, <results file>, <path>), so the command is not one machine's."""
    names = {"--out": "<out dir>", "--results": "<results file>"}
    out, flag = [], None
    for a in argv:
        key, eq, val = a.partition("=")  # --flag=value, a.b=value (override), or a bare value
        if not eq:
            key, val = "", a
        value = None if (a.startswith("--") and not eq) else val
        if value is not None and Path(value).is_absolute():
            try:
                value = str(Path(value).resolve().relative_to(REPO))
            except ValueError:
                value = names.get(key or flag, "<path>")
            a = f"{key}={value}" if eq else value
        out.append(a)
        flag = a if a.startswith("--") and not eq else None
    return out


def main() -> None:
    from sift_megatron import quickstart as Q
    from sift_megatron.config import atomic_write_text
    from sift_megatron.ift.flops import flop_report

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--corpus-size", default="6MB")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--results", default=str(REPO / "docs" / "RESULTS.md"))
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all 17)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    data = Q.prepare_data(out, f"default:{args.corpus_size}", args.vocab_size)
    selected = runs()
    if args.only:
        selected = {k: v for k, v in selected.items() if k in args.only.split(",")}
    rows, t0 = [], time.perf_counter()
    for name, overrides in selected.items():
        print(f"[reproduce] {name}", flush=True)
        r = Q._train(name, [*overrides, *args.overrides], out, data, args.nproc, args.steps)
        _, val = Q._metrics(r["dir"])
        rep = flop_report(r["cfg"])
        stored, active = Q._params(r["dir"])
        rows.append({"name": name, "val_loss": val[-1][1], "ppl": math.exp(val[-1][1]),
                     "flops_transformed": rep["transformed"]["transformed_layers"],
                     "flops_total": rep["transformed"]["total"], "ratio_transformed": rep["ratio"]["transformed_layers"],
                     "stored": stored, "active": active, "wall_s": r["wall_s"]})
    dense = next((r for r in rows if r["name"] == "dense"), None)
    cmd = "python benchmarks/reproduce.py " + " ".join(portable_args(sys.argv[1:]))
    lines = ["# Reproduction: dense vs Sparse-IFT families", "",
             f"Command: `{cmd.strip()}` (total {time.perf_counter() - t0:.0f} s on this machine).",
             f"Config: `{Path(Q.CONFIG).relative_to(REPO)}`, built-in corpus ({args.corpus_size}), vocab {args.vocab_size}, "
             f"{args.steps} steps per run, {args.nproc} ranks (TP={args.nproc}); every run sees the same tokens.", "",
             "| run | val loss | vs dense | val ppl | transformed-layer FLOP ratio | whole-model MFLOPs/token | "
             "params active / stored | wall |", "|" + "---|" * 8]
    for r in rows:
        delta = f"{r['val_loss'] - dense['val_loss']:+.4f}" if dense else "n/a"
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {delta} | {r['ppl']:.1f} | {r['ratio_transformed']:.3f} | "
                     f"{r['flops_total'] / 1e6:.3f} | {r['active'] / 1e6:.3f}M / {r['stored'] / 1e6:.3f}M | "
                     f"{r['wall_s']:.0f} s |")
    lines += ["", "Raw numbers: `results.json` in the output directory.", ""]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, "\n".join(lines))
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
