"""Does Sparse-IFT beat dense? The study behind docs/RESULTS.md, sized to run on 2 CPU cores in a set time.

Per shape ("tiny": the quickstart's model, where the LM head is half the FLOPs; "mid": 8 layers, where the
transformed layers are ~75 % of the FLOPs and the LM head ~12 %):
- a dense width sweep (5 widths): the dense frontier of validation loss vs whole-model training FLOPs;
- Sparse Wide s=0.5 / 0.75 (static and RigL, >= 20 mask updates), Sparse Parallel, Factorized and Doped
  (s=0.5, static) at their iso points (the base width's transformed-layer FLOPs);
- every arm: the LR picked from a grid on seed 0, then the other seeds at that LR; mean +- std over seeds;
- verdict per sparse arm: vs dense at equal transformed-layer FLOPs (the base width) and vs the dense frontier
  at equal whole-model training FLOPs (interpolated in log-FLOPs); "yes" only when ahead by > 2 standard
  errors, "no" when behind by > 2, else "tie";
- Ramanujan gap (delta_r) and weighted spectral gap (lambda) of the Sparse Wide s=0.75 masks, RigL vs static,
  at several steps of training (computed in-process by the trainer: `spectral.interval`).
Every run is a plain `sift train` under torchrun (sift_megatron/quickstart.py's driver), `--jobs` at a time.

Usage:
  python benchmarks/reproduce.py --budget 7200 --out runs/reproduce --results docs/RESULTS.md
      calibrate every arm (a few steps each), pick the steps per shape that fit the budget (seconds of wall
      time, calibration included), run the study
  python benchmarks/reproduce.py --budget 7200 --plan      calibrate and print the plan and its time estimate only
  python benchmarks/reproduce.py --steps tiny=300,mid=150  fixed steps, no calibration
  python benchmarks/reproduce.py --smoke --out DIR          every code path in about a minute (tests/test_reproduce.py)
Outputs under --out: report.md (tables), frontier.png, spectral.png, results.json (every run), verdict.json;
the last stdout line is the verdict as one JSON line. --results FILE replaces the part of FILE between
`<!-- reproduce:begin -->` and `<!-- reproduce:end -->` with report.md. A run whose result.json matches its
settings is reused (an interrupted study resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
RIGL = ["dst.algorithm=rigl", "dst.end=0.75", "dst.drop_fraction=0.3"]
ARMS = {
    "wide_s50_static": ["sparsity.family=wide", "sparsity.s=0.5", "sparsity.exact_iso=true"],
    "wide_s50_rigl": ["sparsity.family=wide", "sparsity.s=0.5", "sparsity.exact_iso=true", *RIGL],
    "wide_s75_static": ["sparsity.family=wide", "sparsity.s=0.75", "sparsity.exact_iso=true"],
    "wide_s75_rigl": ["sparsity.family=wide", "sparsity.s=0.75", "sparsity.exact_iso=true", *RIGL],
    "parallel_s50_static": ["sparsity.family=parallel", "sparsity.s=0.5"],
    "factorized_s50_static": ["sparsity.family=factorized", "sparsity.s=0.5"],
    "doped_s50_static": ["sparsity.family=doped", "sparsity.s=0.5"],
}
SPECTRAL_ARMS = ("wide_s75_static", "wide_s75_rigl")


@dataclasses.dataclass(frozen=True)
class Shape:
    overrides: tuple[str, ...]  # on configs/tiny/quickstart.yaml
    widths: tuple[int, ...]  # dense sweep (hidden sizes)
    base: int  # the width the sparse arms transform
    vocab: int
    corpus: str
    share: float  # fraction of the budget
    eval_iters: int  # global batches of the final validation (same samples for every run)


SHAPES = {
    # quickstart model: 4 x 64, seq 128, vocab 4096, 16 x 128 tokens per step; LM head ~50 % of forward FLOPs
    "tiny": Shape((), (32, 48, 64, 96, 128), 64, 4096, "default:6MB", 1 / 3, 20),
    # 8 x 128, seq 128, vocab 2048: transformed layers 75 %, attention 12.5 %, LM head 12.5 % of forward FLOPs
    "mid": Shape(("model.num_layers=8", "model.hidden_size=128", "model.seq_length=128"),
                 (64, 96, 128, 160, 192), 128, 2048, "default:6MB", 2 / 3, 20),
}
SMOKE = {"smoke": Shape(("model.num_layers=2", "model.hidden_size=32", "model.seq_length=32",
                         "train.global_batch_size=4", "train.micro_batch_size=4"),
                        (16, 32, 64), 32, 600, "default:1MB", 1.0, 2)}


@dataclasses.dataclass(frozen=True)
class Run:
    shape: str
    arm: str
    lr: float
    seed: int
    steps: int
    spectral: bool = True  # calibration runs time the spectral analysis apart (spectral_cost)

    @property
    def name(self) -> str:
        return f"{self.shape}/{self.arm}/lr{self.lr:g}_seed{self.seed}_steps{self.steps}"


def dense_arm(width: int) -> str:
    return f"dense_w{width}"


def arms_of(shape: Shape, sparse: list[str]) -> dict[str, list[str]]:
    out = {dense_arm(w): [f"model.hidden_size={w}"] for w in shape.widths}
    return out | {a: [f"model.hidden_size={shape.base}", *ARMS[a]] for a in sparse}


def rigl_interval(steps: int, min_updates: int) -> int:
    """The largest dst.interval giving >= min_updates mask updates before dst.end (0.75 of training); 1 when
    even every step gives fewer."""
    from sift_megatron.dst.schedule import DSTSchedule

    for interval in range(max(1, steps), 0, -1):
        if len(DSTSchedule(interval=interval, end=0.75, total_steps=steps).update_steps()) >= min_updates:
            return interval
    return 1


def run_overrides(run: Run, shape: Shape, arm_over: list[str], args) -> list[str]:
    over = [*shape.overrides, *arm_over, f"train.steps={run.steps}", f"train.seed={run.seed}",
            f"optimizer.lr={run.lr:g}", f"optimizer.min_lr={run.lr / 10:g}",
            f"lr_schedule.warmup_steps={max(1, run.steps // 10)}", "train.eval_interval=0",
            f"train.eval_iters={shape.eval_iters}", "train.save=false", "logging.tensorboard=false",
            "logging.progress=false"]
    log_every = max(1, run.steps // 20)
    if "dst.algorithm=rigl" in arm_over:
        over.append(f"dst.interval={rigl_interval(run.steps, args.min_updates)}")
    if run.spectral and run.arm in SPECTRAL_ARMS and args.spectral_points:
        log_every = max(1, run.steps // args.spectral_points)
        over.append(f"spectral.interval={log_every}")
    return [*over, f"logging.log_interval={log_every}", *args.overrides]


def dst_updates(cfg) -> int:
    """Mask updates the run's DST schedule makes (0 for static masks)."""
    from sift_megatron.dst.schedule import DSTSchedule

    if cfg.sparsity.family == "dense" or cfg.dst.algorithm == "static":
        return 0
    return len(DSTSchedule.from_config(cfg.dst, cfg.train.steps).update_steps())


def train(run: Run, over: list[str], out: Path, data: dict, nproc: int) -> dict:
    """One `sift train` (reused when its result.json holds the same settings): final validation loss, FLOPs,
    step time, DST updates and the spectral metrics the trainer logged."""
    from sift_megatron import quickstart as Q
    from sift_megatron.config import atomic_write_text
    from sift_megatron.ift.flops import flop_report

    run_dir = out / "runs" / run.name
    key = {"run": dataclasses.asdict(run), "overrides": over, "nproc": nproc, "data": data}
    cached = run_dir / "result.json"
    if cached.exists():
        old = json.loads(cached.read_text())
        if old.get("key") == key:
            return old
    r = Q._train(run.name, over, out, data, nproc, None, port=Q.free_port(), echo=False)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    val = [x["val_loss"] for x in rows if "val_loss" in x]
    times = [x["step_time_s"] for x in rows if "step_time_s" in x and x["step"] > 2]
    rep, cfg = flop_report(r["cfg"]), r["cfg"]
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.model.seq_length
    res = {"key": key, **dataclasses.asdict(run), "val_loss": val[-1] if val and math.isfinite(val[-1]) else math.inf,
           "train_flops": rep["transformed"]["training"]["per_token"] * tokens, "tokens": tokens,
           "fwd_transformed": rep["transformed"]["transformed_layers"], "fwd_total": rep["transformed"]["total"],
           "hidden": rep["shape"]["transformed"]["hidden_size"], "wall_s": r["wall_s"],
           "step_s": statistics.median(times) if times else None,
           "dst_updates": dst_updates(cfg),
           "spectral": [[x["step"], x.get("spectral/delta_r"), x.get("spectral/lambda")]
                        for x in rows if "spectral/delta_r" in x or "spectral/lambda" in x]}
    atomic_write_text(cached, json.dumps(res))
    return res


def run_all(runs: list[Run], ctx) -> list[dict]:
    def one(run: Run) -> dict:
        t0 = time.perf_counter()
        res = train(run, run_overrides(run, ctx.shapes[run.shape], ctx.arms[run.shape][run.arm], ctx.args),
                    ctx.out, ctx.data[run.shape], ctx.args.nproc)
        print(f"[reproduce] {run.name}: val {res['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return res

    with ThreadPoolExecutor(ctx.args.jobs) as pool:
        return list(pool.map(one, runs))


# ----------------------------------------------------------------------------------------------------------
# Budget: calibrate, then pick the steps per shape


def spectral_cost(shape: Shape, arm: str) -> float:
    """Seconds for one in-process spectral analysis of the arm's masks (random masks of the same shapes)."""
    import numpy as np

    from sift_megatron import quickstart as Q
    from sift_megatron.config import load_config
    from sift_megatron.ift.sizes import transformed_shape
    from sift_megatron.spectral.metrics import analyze_masks

    cfg = load_config(Q.CONFIG, [*shape.overrides, *arms_of(shape, [arm])[arm], f"model.vocab_size={shape.vocab}"])
    ts = transformed_shape(cfg)
    rng = np.random.default_rng(0)
    masks = {f"layers.{i}.{slot}": (rng.random((o, n)) < 1 - ts.sparsity, rng.standard_normal((o, n)))
             for i in range(cfg.model.num_layers) for slot, (n, o) in ts.linear_dims().items()}
    t0 = time.perf_counter()
    analyze_masks(masks)
    return time.perf_counter() - t0


def calibrate(ctx, steps: int) -> dict:
    """Time one short run of every (shape, arm) at the base LR; see calibration_table."""
    runs = [Run(s, a, ctx.args.lr, 0, steps, spectral=False) for s in ctx.shapes for a in ctx.arms[s]]
    t0 = time.perf_counter()
    res = run_all(runs, ctx)
    return {"table": calibration_table(res, lambda s, a: spectral_cost(ctx.shapes[s], a)),
            "wall_s": time.perf_counter() - t0}


def calibration_table(results: list[dict], spec_cost) -> dict:
    """{(shape, arm): (fixed seconds per run, seconds per step, seconds per spectral analysis)} from short runs:
    per step the median step time (steps > 2), fixed = wall - steps x per step (start-up, the final
    validation, exit); spectral analyses timed apart by spec_cost(shape, arm) (Sparse Wide s=0.75 only)."""
    cal = {}
    for r in results:
        per_step = r["step_s"] or r["wall_s"] / r["steps"]
        spec = spec_cost(r["shape"], r["arm"]) if r["arm"] in SPECTRAL_ARMS else 0.0
        cal[(r["shape"], r["arm"])] = (max(0.0, r["wall_s"] - r["steps"] * per_step), per_step, spec)
    return cal


def run_seconds(cal: tuple, steps: int, spectral_points: int) -> float:
    fixed, per_step, spec = cal
    return fixed + steps * per_step + (spectral_points * spec if spec else 0.0)


def makespan(durations: list[float], jobs: int) -> float:
    """Wall time of running the durations in order on `jobs` workers (each takes the next when free)."""
    free = [0.0] * jobs
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free) if durations else 0.0


def plan_steps(cal: dict, shapes: dict, arms: dict, budget: float, jobs: int, n_lrs: int, seeds: int,
               spectral_points: int, lo: int, hi: int) -> tuple[dict, float]:
    """Steps per shape so the study's work fits each shape's share of `budget` seconds on `jobs` workers,
    clamped to [lo, hi]; and the estimated wall time (grid phase, then seeds phase, as scheduled)."""
    runs_per_arm = n_lrs + seeds - 1
    steps = {}
    for s, shape in shapes.items():
        fixed = sum(runs_per_arm * run_seconds(cal[(s, a)], 0, spectral_points) for a in arms[s])
        per_step = sum(runs_per_arm * cal[(s, a)][1] for a in arms[s])
        steps[s] = int(min(hi, max(lo, (shape.share * budget * jobs - fixed) // per_step)))
    return steps, estimate(cal, arms, steps, jobs, n_lrs, seeds, spectral_points)


def estimate(cal: dict, arms: dict, steps: dict, jobs: int, n_lrs: int, seeds: int, spectral_points: int) -> float:
    grid = [run_seconds(cal[(s, a)], steps[s], spectral_points) for s in steps for a in arms[s] for _ in range(n_lrs)]
    rest = [run_seconds(cal[(s, a)], steps[s], spectral_points) for s in steps for a in arms[s]
            for _ in range(seeds - 1)]
    return makespan(grid, jobs) + makespan(rest, jobs)


# ----------------------------------------------------------------------------------------------------------
# Aggregation and verdict


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(results: list[dict], shapes: dict, arms: dict, best_lr: dict) -> dict:
    agg = {}
    for s in shapes:
        agg[s] = {}
        for a in arms[s]:
            rs = [r for r in results if r["shape"] == s and r["arm"] == a and r["lr"] == best_lr[(s, a)]]
            m, sd = mean_std([r["val_loss"] for r in rs])
            agg[s][a] = {"mean": m, "std": sd, "n": len(rs), "se": sd / math.sqrt(len(rs)), "lr": best_lr[(s, a)],
                         "train_flops": rs[0]["train_flops"], "fwd_transformed": rs[0]["fwd_transformed"],
                         "fwd_total": rs[0]["fwd_total"], "hidden": rs[0]["hidden"],
                         "dst_updates": rs[0]["dst_updates"], "seeds": sorted(r["seed"] for r in rs),
                         "grid": {f"{r['lr']:g}": r["val_loss"] for r in results
                                  if r["shape"] == s and r["arm"] == a and r["seed"] == 0}}
    return agg


def call(delta: float, se: float) -> str:
    """yes: ahead of dense by more than 2 standard errors; no: behind by more; tie: within."""
    return "yes" if delta < -2 * se else ("no" if delta > 2 * se else "tie")


def pareto(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The sweep points no cheaper point beats: with a budget of C FLOPs one trains the best dense model that
    costs <= C, so a wider model that does worse than a narrower one is not on the frontier."""
    out = []
    for p in sorted(points):
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def frontier_at(points: list[tuple[float, float, float]], flops: float) -> tuple[float, float] | None:
    """(loss, standard error) of the dense frontier at `flops`: linear in log-FLOPs between the two Pareto
    points around it, flat after the last one up to the widest sweep point; None outside the sweep (no
    extrapolation)."""
    pts = pareto(points)
    if not pts or flops < pts[0][0] or flops > max(c for c, _, _ in points):
        return None
    for (c0, l0, e0), (c1, l1, e1) in zip(pts, pts[1:]):
        if c0 <= flops <= c1:
            t = (math.log(flops) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return l0 + t * (l1 - l0), e0 + t * (e1 - e0)
    return pts[-1][1], pts[-1][2]


def dense_flops_for(points: list[tuple[float, float, float]], loss: float) -> float | None:
    """Whole-model training FLOPs at which the dense frontier reaches `loss` (log-linear between Pareto
    points); None when no sweep point is that good or the cheapest already is."""
    pts = pareto(points)
    for (c0, l0, _), (c1, l1, _) in zip(pts, pts[1:]):
        if l1 <= loss <= l0:
            t = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return None


def verdict(agg: dict, shapes: dict) -> dict:
    out = {}
    for s, shape in shapes.items():
        arms = agg[s]
        base = arms[dense_arm(shape.base)]
        points = [(arms[dense_arm(w)]["train_flops"], arms[dense_arm(w)]["mean"], arms[dense_arm(w)]["se"])
                  for w in shape.widths]
        out[s] = {}
        for a, r in arms.items():
            if a.startswith("dense_w"):
                continue
            d_iso, se_iso = r["mean"] - base["mean"], math.hypot(r["se"], base["se"])
            v = {"val_loss": r["mean"], "std": r["std"], "n": r["n"],
                 "whole_model_flop_ratio": r["train_flops"] / base["train_flops"],
                 "iso_delta": d_iso, "iso_se": se_iso, "beats_iso": call(d_iso, se_iso)}
            f = frontier_at(points, r["train_flops"])
            if f is None:
                v.update(frontier_delta=None, frontier_se=None, beats_frontier="n/a (outside the sweep)")
            else:
                d_f, se_f = r["mean"] - f[0], math.hypot(r["se"], f[1])
                v.update(frontier_delta=d_f, frontier_se=se_f, beats_frontier=call(d_f, se_f))
            c = dense_flops_for(points, r["mean"])
            v["dense_flops_multiplier"] = None if c is None else c / r["train_flops"]
            if c is None and r["mean"] < min(lo for _, lo, _ in points):  # better than the whole sweep
                v["dense_flops_multiplier_above"] = max(c for c, _, _ in points) / r["train_flops"]
            out[s][a] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# Plots and report


def _save(fig, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def plot_frontier(agg: dict, shapes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.6), squeeze=False)
    markers = "osD^v<>Pp*"
    for ax, (s, shape) in zip(axes[0], shapes.items()):
        dense = [agg[s][dense_arm(w)] for w in shape.widths]
        ax.errorbar([d["train_flops"] for d in dense], [d["mean"] for d in dense], [d["std"] for d in dense],
                    fmt="k-o", capsize=3, label="dense width sweep (frontier)")
        for w, d in zip(shape.widths, dense):
            ax.annotate(f"h={w}", (d["train_flops"], d["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        sparse = [a for a in agg[s] if not a.startswith("dense_w")]
        for i, a in enumerate(sparse):
            r = agg[s][a]
            ax.errorbar([r["train_flops"]], [r["mean"]], [r["std"]], fmt=markers[i % len(markers)], capsize=3,
                        label=a)
        ax.set_xscale("log")
        ax.set_xlabel("whole-model training FLOPs (run)")
        ax.set_ylabel("validation loss (mean +- std over seeds)")
        ax.set_title(f"{s}: dense frontier vs Sparse-IFT arms", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def spectral_series(results: list[dict], agg: dict, s: str, a: str) -> list[tuple[int, list[float], list[float]]]:
    """Per logged step: the delta_r and lambda values of the arm's seeds at its chosen LR."""
    by_step: dict[int, tuple[list, list]] = {}
    for r in results:
        if r["shape"] == s and r["arm"] == a and r["lr"] == agg[s][a]["lr"]:
            for step, dr, lam in r["spectral"]:
                d, lm = by_step.setdefault(step, ([], []))
                if dr is not None:
                    d.append(dr)
                if lam is not None:
                    lm.append(lam)
    return [(k, *by_step[k]) for k in sorted(by_step)]


def plot_spectral(results: list[dict], agg: dict, shapes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 6.5), squeeze=False)
    for j, s in enumerate(shapes):
        for a in (a for a in SPECTRAL_ARMS if a in agg[s]):
            ser = spectral_series(results, agg, s, a)
            for i, label in enumerate(("Ramanujan gap delta_r", "weighted spectral gap lambda")):
                pts = [(k, *mean_std(v[i])) for k, *v in ser if v[i]]
                if not pts:
                    continue
                ks, ms, sds = zip(*pts)
                line, = axes[i][j].plot(ks, ms, "o-", label=a)
                axes[i][j].fill_between(ks, [m - d for m, d in zip(ms, sds)], [m + d for m, d in zip(ms, sds)],
                                        color=line.get_color(), alpha=0.2)
                axes[i][j].set_ylabel(label)
        for i in range(2):
            axes[i][j].set_xlabel("step")
            axes[i][j].set_title(f"{s}: mask spectra over training (mean +- std over seeds)", fontsize=9)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _pm(m: float | None, e: float | None, fmt: str = "+.4f") -> str:
    return "n/a" if m is None else f"{m:{fmt}} +- {e:.4f}"


def report(ctx, results: list[dict], agg: dict, ver: dict, steps: dict, timing: dict) -> str:
    a = ctx.args
    lines = [f"Command: `{ctx.command}`", "",
             f"Wall time: {timing['total']:.0f} s measured on this machine ({a.jobs} runs at a time, {a.nproc} rank(s) "
             "each" + (f"; calibration {timing['calibration']:.0f} s, estimate before the study "
                       f"{timing['estimate']:.0f} s" if "estimate" in timing else "")
             + f"); the {len(results)} runs' own wall times add up to {sum(r['wall_s'] for r in results):.0f} s "
             "(runs reused from an earlier call count there, not in the wall time).",
             f"Seeds: {a.seeds} (mean +- sample std; SE = std/sqrt(n)); LR grid on seed 0: "
             f"{', '.join(f'{x:g}' for x in ctx.lrs)} (min LR = LR/10, warm-up 10 %, cosine); RigL: >= "
             f"{a.min_updates} mask updates before 75 % of training (drop fraction 0.3, cosine). "
             "Each run validates once at the end on the same validation samples.", ""]
    for s, shape in ctx.shapes.items():
        r0 = next(r for r in results if r["shape"] == s)
        lines += [f"### {s}: {' '.join(shape.overrides) or 'configs/tiny/quickstart.yaml as is'}", "",
                  f"{steps[s]} steps, {r0['tokens']:,} training tokens per run, vocab {shape.vocab} "
                  f"(built-in corpus {shape.corpus}), validation {shape.eval_iters} global batches; sparse arms "
                  f"transform the width {shape.base}.", "",
                  "| arm | hidden | LR (grid: val loss at seed 0) | val loss mean +- std (n) | whole-model training "
                  "FLOPs | x dense | transformed-layer MFLOPs/token | DST updates |", "|" + "---|" * 8]
        base = agg[s][dense_arm(shape.base)]
        for arm, r in agg[s].items():
            grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["grid"].items())
            lines.append(f"| {arm} | {r['hidden']} | {r['lr']:g} ({grid}) | {r['mean']:.4f} +- {r['std']:.4f} "
                         f"({r['n']}) | {r['train_flops']:.3e} | {r['train_flops'] / base['train_flops']:.3f} | "
                         f"{r['fwd_transformed'] / 1e6:.3f} | {r['dst_updates']} |")
        lines += ["", f"Verdict ({s}): loss deltas are arm - dense, negative = better; +- the standard error of "
                  "the difference.", "",
                  "| arm | vs dense at equal transformed-layer FLOPs | beats? | vs dense frontier at equal "
                  "whole-model FLOPs | beats? | dense FLOPs for its loss / its FLOPs |", "|" + "---|" * 6]
        for arm, v in ver[s].items():
            mult = ("n/a" if v["dense_flops_multiplier"] is None else f"{v['dense_flops_multiplier']:.2f}x")
            if "dense_flops_multiplier_above" in v:
                mult = f"> {v['dense_flops_multiplier_above']:.2f}x (better than every sweep width)"
            lines.append(f"| {arm} | {_pm(v['iso_delta'], v['iso_se'])} | {v['beats_iso']} | "
                         f"{_pm(v['frontier_delta'], v['frontier_se'])} | {v['beats_frontier']} | {mult} |")
        spec = [(arm, spectral_series(results, agg, s, arm)) for arm in SPECTRAL_ARMS if arm in agg[s]]
        if any(ser for _, ser in spec):
            lines += ["", f"Mask spectra ({s}, model averages over the transformed layers, mean +- std over seeds):",
                      "", "| arm | step | delta_r (Ramanujan gap) | lambda (weighted spectral gap) |", "|---|---|---|---|"]
            for arm, ser in spec:
                for k, dr, lam in ser:
                    lines.append(f"| {arm} | {k} | {_pm(*mean_std(dr), '.4f') if dr else 'n/a'} | "
                                 f"{_pm(*mean_std(lam), '.4f') if lam else 'n/a'} |")
        lines.append("")
    lines += ["Plots: `frontier.png` (every arm on the dense frontier), `spectral.png` (mask spectra over training); "
              "raw numbers: `results.json`, `verdict.json` in the output directory.", ""]
    return "\n".join(lines)


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


def splice(path: Path, body: str) -> None:
    """Replace the text between the reproduce markers of `path` (appended with them when absent)."""
    from sift_megatron.config import atomic_write_text

    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    atomic_write_text(path, text)


def parse_steps(text: str, shapes: dict) -> dict:
    steps = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k not in shapes or not v.isdigit() or int(v) < 1:
            raise SystemExit(f"--steps wants shape=N for shapes {', '.join(shapes)}, got {part!r}")
        steps[k] = int(v)
    if set(steps) != set(shapes):
        raise SystemExit(f"--steps needs every shape: {', '.join(shapes)}")
    return steps


@dataclasses.dataclass
class Ctx:
    args: argparse.Namespace
    shapes: dict
    arms: dict
    data: dict
    out: Path
    lrs: list
    command: str


def main() -> None:
    from sift_megatron import quickstart as Q
    from sift_megatron.config import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--budget", type=float, default=None, help="seconds of wall time for the whole study")
    ap.add_argument("--plan", action="store_true", help="with --budget: calibrate, print the plan, stop")
    ap.add_argument("--steps", default=None, help="fixed steps per shape instead of --budget, e.g. tiny=300,mid=150")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer shape, 3 widths, Sparse Wide s=0.75 static/RigL,"
                    " 2 LRs, 2 seeds, 8 steps: every code path in about a minute")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of: " + ", ".join(SHAPES))
    ap.add_argument("--arms", default=None, help="comma-separated sparse arms (default all): " + ", ".join(ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3, help="centre of the LR grid")
    ap.add_argument("--lr-factors", default="0.5,1,2", help="the LR grid as factors of --lr")
    ap.add_argument("--min-updates", type=int, default=20, help="RigL mask updates per run (at least)")
    ap.add_argument("--spectral-points", type=int, default=6, help="spectral analyses per Sparse Wide s=0.75 run")
    ap.add_argument("--min-steps", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--calibration-steps", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (x --nproc ranks = cores used)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per run (TP degree)")
    ap.add_argument("--results", default=None, help="also splice report.md into this file between the markers")
    ap.add_argument("overrides", nargs="*", help="a.b=c config overrides for every run")
    a = ap.parse_args()
    t_start = time.perf_counter()
    shapes = dict(SMOKE if a.smoke else SHAPES)
    if a.shapes:
        bad = [x for x in a.shapes.split(",") if x not in SHAPES]
        if bad:
            raise SystemExit(f"--shapes: unknown {', '.join(bad)}; allowed: {', '.join(SHAPES)}")
        shapes = {k: v for k, v in SHAPES.items() if k in a.shapes.split(",")}
    sparse = ["wide_s75_static", "wide_s75_rigl"] if a.smoke else list(ARMS)
    if a.arms:
        bad = [x for x in a.arms.split(",") if x not in ARMS]
        if bad:
            raise SystemExit(f"--arms: unknown {', '.join(bad)}; allowed: {', '.join(ARMS)}")
        sparse = a.arms.split(",")
    if a.smoke:
        a.seeds, a.lr_factors, a.min_updates = 2, "0.5,1", 5
        a.min_steps = a.max_steps = 8
        a.spectral_points = 4
    if (a.budget is None) == (a.steps is None) and not a.smoke:
        raise SystemExit("give --budget SECONDS or --steps shape=N,...")
    if a.plan and a.budget is None:
        raise SystemExit("--plan needs --budget SECONDS")
    if a.jobs < 1 or a.nproc < 1 or a.seeds < 1:
        raise SystemExit("--jobs, --nproc and --seeds must be >= 1")
    lrs = [a.lr * float(f) for f in a.lr_factors.split(",")]
    out = Path(a.out)
    data = {s: Q.prepare_data(out / f"data_{sh.corpus.split(':')[-1]}_v{sh.vocab}", sh.corpus, sh.vocab)
            for s, sh in shapes.items()}
    ctx = Ctx(a, shapes, {s: arms_of(sh, sparse) for s, sh in shapes.items()}, data, out, lrs,
              "python benchmarks/reproduce.py " + " ".join(portable_args(sys.argv[1:])))
    timing = {}
    if a.budget is not None and not a.smoke:
        cal = calibrate(ctx, a.calibration_steps)
        timing["calibration"] = cal["wall_s"]
        budget = (a.budget or 0) - cal["wall_s"]
        steps, est = plan_steps(cal["table"], shapes, ctx.arms, budget, a.jobs, len(lrs), a.seeds, a.spectral_points,
                                a.min_steps, a.max_steps)
        timing["estimate"] = est + cal["wall_s"]
        plan = {"steps": steps, "estimated_wall_s": round(timing["estimate"]), "calibration_s": round(cal["wall_s"]),
                "per_run_s": {f"{s}/{arm}": [round(x, 3) for x in c] for (s, arm), c in cal["table"].items()}}
        print("[reproduce] plan " + json.dumps(plan), flush=True)
        atomic_write_text(out / "plan.json", json.dumps(plan, indent=1))
        if a.plan:
            return
    else:
        steps = {s: a.min_steps for s in shapes} if a.smoke else parse_steps(a.steps, shapes)

    grid = [Run(s, arm, lr, 0, steps[s]) for s in shapes for arm in ctx.arms[s] for lr in lrs]
    results = run_all(grid, ctx)
    best_lr = {}
    for s in shapes:
        for arm in ctx.arms[s]:
            best_lr[(s, arm)] = min((r for r in results if r["shape"] == s and r["arm"] == arm),
                                    key=lambda r: r["val_loss"])["lr"]
    results += run_all([Run(s, arm, best_lr[(s, arm)], seed, steps[s]) for s in shapes for arm in ctx.arms[s]
                        for seed in range(1, a.seeds)], ctx)
    agg = aggregate(results, shapes, ctx.arms, best_lr)
    ver = verdict(agg, shapes)
    plot_frontier(agg, shapes, out / "frontier.png")
    plot_spectral(results, agg, shapes, out / "spectral.png")
    timing["total"] = time.perf_counter() - t_start
    md = report(ctx, results, agg, ver, steps, timing)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "results.json", json.dumps([{k: v for k, v in r.items() if k != "key"} for r in results],
                                                       indent=1))
    atomic_write_text(out / "verdict.json", json.dumps(ver, indent=1))
    if a.results:
        splice(Path(a.results), md)
    print(md, flush=True)
    print(json.dumps({"verdict": ver, "steps": steps, "wall_s": round(timing["total"])}), flush=True)


if __name__ == "__main__":
    main()
