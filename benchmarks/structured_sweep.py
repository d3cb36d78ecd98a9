"""Does block-sparse (or 2:4) Sparse-IFT keep the quality of unstructured masks? Sparse Wide at s in {0.5, 0.75},
static and RigL, block size in {1 (unstructured), 16, 32, 64} and 2:4 at s=0.5, several seeds, against dense;
validation loss mean +- std per setting, a plot, and the verdict: per (s, algorithm), the largest block size whose
mean validation loss is within one std of the unstructured run's (std pooled over the two settings' seeds).

Usage: python benchmarks/structured_sweep.py [--steps 300] [--seeds 0,1,2] [--blocks 1,16,32,64] [--nproc 2]
       [--jobs 1] [--out runs/structured_sweep] [--results FILE] [--only NAME,...] [a.b=c ...]
--jobs runs side by side (2 cores: --nproc 1 --jobs 2); a finished run with the same settings is reused, so an
interrupted sweep resumes. RigL gets at least 20 mask updates before 75 % of training (drop fraction 0.3, cosine).
The a.b=c overrides set the shape for every run (e.g. model.hidden_size=256 model.num_attention_heads=2
sparsity.align=64: 64 x 64 tiles need every TP shard's dims and the head dim to be multiples of 64). A setting
whose tiles / groups do not fit that shape is listed as not run, with the reason (ift/flops.check_pattern_fits).
2:4 needs the sparsity used to be exactly 0.5, so its runs leave exact_iso / align off. The results go to
`<out>/STRUCTURED.md` and `<out>/results.json`; --results also writes the section into FILE (e.g. docs/RESULTS.md)
between `<!-- structured-sweep -->` markers, replacing a previous one. Reuses the quickstart's data and driver.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MARK = "<!-- structured-sweep -->"


def rigl(steps: int, updates: int = 20) -> list[str]:
    """RigL with at least `updates` mask updates before 75 % of training (drop fraction 0.3, cosine)."""
    return ["dst.algorithm=rigl", f"dst.interval={max(1, int(0.75 * steps) // updates)}", "dst.end=0.75"]


def settings(blocks: list[int], steps: int = 300) -> dict[str, list[str]]:
    """Setting name -> overrides (seeds added later)."""
    out: dict[str, list[str]] = {"dense": []}
    for s in (0.5, 0.75):
        for algo in ("static", "rigl"):
            dst = rigl(steps) if algo == "rigl" else []
            for b in blocks:
                pat = ["sparsity.pattern=block", f"sparsity.block={b}"] if b > 1 else []
                out[f"wide_s{int(s * 100)}_{algo}_b{b}"] = ["sparsity.family=wide", f"sparsity.s={s}", *pat, *dst]
            if s == 0.5:
                out[f"wide_s50_{algo}_2of4"] = ["sparsity.family=wide", "sparsity.s=0.5", "sparsity.pattern=2:4",
                                                "sparsity.exact_iso=false", "sparsity.align=1", *dst]
    return out


def summarise(losses: dict[str, list[float]]) -> dict[str, dict]:
    """Per setting: mean, std (sample std over seeds; 0 with one seed), n."""
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in losses.items() if v}


def verdict(stats: dict[str, dict]) -> dict[str, dict]:
    """Per (s, algorithm) with an unstructured result: the largest block whose mean is within one pooled std of
    unstructured, and each block's gap in those stds."""
    out: dict[str, dict] = {}
    for key, ref in stats.items():
        if not key.endswith("_b1"):
            continue
        base = key[: -len("_b1")]
        gaps, best = {}, 1
        for name, st in stats.items():
            if not name.startswith(base + "_b") or name == key:
                continue
            b = int(name[len(base) + 2:])
            pooled = math.sqrt((ref["std"] ** 2 + st["std"] ** 2) / 2)
            diff = st["mean"] - ref["mean"]
            ok = abs(diff) <= pooled
            gaps[b] = {"diff": diff, "pooled_std": pooled, "within": ok}
            if ok:
                best = max(best, b)
        out[base] = {"largest_block_within_1std": best, "blocks": dict(sorted(gaps.items()))}
    return out


def markdown(stats: dict[str, dict], skipped: dict[str, str], verdicts: dict[str, dict], header: list[str]) -> str:
    dense = stats.get("dense")
    lines = [*header, "", "| setting | seeds | val loss mean | std | vs unstructured | vs dense |", "|" + "---|" * 6]
    for name, st in stats.items():
        ref = stats.get(name.rsplit("_", 1)[0] + "_b1") if "_b" in name or name.endswith("2of4") else None
        vs_un = f"{st['mean'] - ref['mean']:+.4f}" if ref is not None and ref is not st else ""
        vs_dense = f"{st['mean'] - dense['mean']:+.4f}" if dense and name != "dense" else ""
        lines.append(f"| {name} | {st['n']} | {st['mean']:.4f} | {st['std']:.4f} | {vs_un} | {vs_dense} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | 0 | not run: {why} | | | |")
    lines += ["", "Verdict (largest block size whose mean validation loss is within one pooled std of unstructured):", ""]
    for base, v in verdicts.items():
        detail = ", ".join(f"{b}: {g['diff']:+.4f} ({'within' if g['within'] else 'outside'} {g['pooled_std']:.4f})"
                           for b, g in v["blocks"].items())
        lines.append(f"- {base}: block {v['largest_block_within_1std']}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put `text` between the markers in `path` (replacing a previous section, else appended); atomic."""
    from sift_megatron.config import atomic_write_text

    old = path.read_text() if path.exists() else ""
    block = f"{MARK}\n{text}{MARK}\n"
    if old.count(MARK) >= 2:
        a, b = old.index(MARK), old.index(MARK, old.index(MARK) + 1) + len(MARK) + 1
        new = old[:a] + block + old[b:]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block
    atomic_write_text(path, new)


def plot(stats: dict[str, dict], path: Path) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for base in sorted({k.rsplit("_b", 1)[0] for k in stats if "_b" in k}):
        pts = sorted((int(k.rsplit("_b", 1)[1]), st) for k, st in stats.items() if k.startswith(base + "_b"))
        ax.errorbar([b for b, _ in pts], [st["mean"] for _, st in pts], yerr=[st["std"] for _, st in pts],
                    marker="o", capsize=3, label=base)
    if "dense" in stats:
        ax.axhline(stats["dense"]["mean"], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size (1 = unstructured)")
    ax.set_ylabel("validation loss (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from sift_megatron import quickstart as Q
    from sift_megatron.config import atomic_write_text, load_config
    from sift_megatron.errors import SiftError
    from sift_megatron.ift.flops import check_pattern_fits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--blocks", default="1,16,32,64")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per run (TP degree)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (x --nproc ranks = cores used)")
    ap.add_argument("--corpus-size", default="6MB")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default="runs/structured_sweep")
    ap.add_argument("--results", default=None, help="also write the section into this file (e.g. docs/RESULTS.md)")
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    chosen = settings([int(b) for b in args.blocks.split(",")], args.steps)
    if args.only:
        unknown = set(args.only.split(",")) - set(chosen)
        if unknown:
            raise SiftError(f"--only names unknown settings {sorted(unknown)}; known: {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    skipped: dict[str, str] = {}
    for name, ov in list(chosen.items()):  # every setting checked before any training
        try:
            check_pattern_fits(load_config(Q.CONFIG, [f"parallel.tensor={args.nproc}", *args.overrides, *ov]))
        except SiftError as e:
            skipped[name] = str(e)
            del chosen[name]
    data = Q.prepare_data(out, f"default:{args.corpus_size}", args.vocab_size)

    def run(name: str, seed: int) -> tuple[float, float]:
        """(validation loss, seconds) of one run; a finished run with the same settings is reused (a sweep
        resumes), with the seconds it took then."""
        over = [*args.overrides, *chosen[name], f"train.seed={seed}"]
        key, done = {"overrides": over, "steps": args.steps, "nproc": args.nproc}, out / "runs" / f"{name}_seed{seed}.json"
        if done.exists() and (old := json.loads(done.read_text()))["key"] == key:
            return old["val_loss"], old["wall_s"]
        print(f"[structured_sweep] {name} seed {seed}", flush=True)
        r = Q._train(f"{name}_seed{seed}", over, out, data, args.nproc, args.steps, port=Q.free_port(), echo=False)
        val = Q._metrics(r["dir"])[1][-1][1]
        atomic_write_text(done, json.dumps({"key": key, "val_loss": val, "wall_s": r["wall_s"]}))
        print(f"[structured_sweep] {name} seed {seed}: val {val:.4f} ({r['wall_s']:.0f} s)", flush=True)
        return val, r["wall_s"]

    jobs = [(name, seed) for name in chosen for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(*j), jobs))
    run_s = sum(s for _, s in results)
    losses: dict[str, list[float]] = {}
    for (name, _), (val, _) in zip(jobs, results):
        losses.setdefault(name, []).append(val)
    stats = summarise(losses)
    verdicts = verdict(stats)
    cmd = " ".join(["python benchmarks/structured_sweep.py", *(argv if argv is not None else sys.argv[1:])])
    header = ["## Structured Sparse-IFT: block / 2:4 masks vs unstructured", "",
              f"Command: `{cmd}` ({run_s:.0f} s of training runs on this machine, about {run_s / args.jobs:.0f} s of "
              f"wall time with {args.jobs} run(s) at a time; config "
              f"`{Path(Q.CONFIG).relative_to(REPO)}`, {args.steps} steps, seeds {args.seeds}, TP={args.nproc}).",
              "Validation loss after the last step; std over seeds."]
    text = markdown(stats, skipped, verdicts, header)
    atomic_write_text(out / "results.json", json.dumps({"losses": losses, "stats": stats, "verdict": verdicts,
                                                        "skipped": skipped}, indent=1))
    atomic_write_text(out / "STRUCTURED.md", text)
    plot(stats, out / "structured_sweep.png")
    if args.results:
        write_section(Path(args.results), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
