"""`sift spectral` reports: a plain-text table, JSON / CSV, and two plots (the (delta_r, lambda) plane per
layer, and model-mean metrics vs training step across checkpoints). Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sift_megatron import config
from sift_megatron.errors import SiftError
from sift_megatron.spectral.metrics import GRAPH_FIELDS, METRICS, analyze_masks

CSV_FIELDS = ("checkpoint", "step", "layer", "status", "reason", *GRAPH_FIELDS, *METRICS, "imdb_subgraphs",
              "imdb_groups")
TABLE = (("density", "dens"), ("d_left", "d_l"), ("d_right", "d_r"), ("mu_hat", "mu_hat"), ("delta_r", "D_r"),
         ("delta_r_norm", "D_r/ub"), ("delta_s", "D_s"), ("lambda", "lambda"), ("delta_r_imdb", "D_r_imdb"),
         ("lambda_imsg", "lam_imsg"), ("full_spectrum", "full"))
TREND = ("delta_r", "delta_r_norm", "delta_s", "lambda", "delta_r_imdb", "lambda_imsg", "full_spectrum")
STEP_PLOT = ("delta_r", "lambda", "delta_r_imdb", "lambda_imsg")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) then rename onto path: a reader never sees half a report."""
    if Path(path).is_dir():
        raise SiftError(f"{path} is a directory; give a file name")
    return config.atomic_write(path, write, "spectral_write")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    last = len(widths) - 1

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join(s.rstrip() for s in [line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def layer_table(result: dict) -> str:
    """Per-layer metrics and the model mean (D = Ramanujan gap; '-' = undefined, see notes)."""
    header = ["layer", "shape", *(h for _, h in TABLE), "note"]
    rows = []
    for r in result["layers"]:
        note = r["reason"] or r.get("weight_note") or ""
        if r["status"] == "ok" and result["iterative"] and not r.get("imdb_subgraphs"):
            note = note or "no valid degree subgraph"
        rows.append([r["name"], f"{r['out']}x{r['in']}", *(_fmt(r[k]) for k, _ in TABLE), note])
    m = result["model"]
    rows.append([f"model mean ({m['scored']}/{m['layers']} scored)", "", "", "", "",
                 *(_fmt(m.get(k)) for k, _ in TABLE[3:]), ""])
    return _grid(header, rows)


def trend_table(runs: list[dict]) -> str:
    header = ["step", "checkpoint", "scored", *TREND]
    rows = [[_fmt(r["step"]), r["checkpoint"], f"{r['model']['scored']}/{r['model']['layers']}",
             *(_fmt(r["model"].get(k)) for k in TREND)] for r in runs]
    return _grid(header, rows)


def write_json(runs: list[dict], path: str | os.PathLike, convention: str, iterative: bool) -> Path:
    doc = {"convention": convention, "iterative": iterative, "checkpoints": runs}
    text = json.dumps(doc, indent=1, allow_nan=False)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def write_csv(runs: list[dict], path: str | os.PathLike) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for run in runs:
        base = {"checkpoint": run["checkpoint"], "step": run["step"]}
        for r in run["layers"]:
            w.writerow({**base, **r, "layer": r["name"]})
        w.writerow({**base, **{k: run["model"].get(k) for k in METRICS}, "layer": "(model mean)", "status": "mean"})
    return atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plot_plane(runs: list[dict], path: str | os.PathLike) -> Path:
    """(delta_r, lambda) per layer; with several checkpoints, each layer's path through the plane and the
    model mean's. Falls back to delta_s on the y axis when no weights were saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey = "lambda" if any(r.get("lambda") is not None for run in runs for r in run["layers"]) else "delta_s"
    kinds = sorted({_kind(r["name"]) for run in runs for r in run["layers"] if r["delta_r"] is not None})
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    names = [r["name"] for r in runs[-1]["layers"]]
    for name in names:
        pts = [(r["delta_r"], r[ykey]) for run in runs for r in run["layers"]
               if r["name"] == name and r["delta_r"] is not None and r[ykey] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        c = colors[_kind(name)]
        if len(pts) > 1:
            ax.plot(xs, ys, "-", color=c, alpha=0.35, lw=0.8)
        ax.scatter(xs[-1:], ys[-1:], color=c, s=18, alpha=0.85)
    means = [(run["model"].get("delta_r"), run["model"].get(ykey), run["step"]) for run in runs]
    means = [m for m in means if m[0] is not None and m[1] is not None]
    if means:
        ax.plot([m[0] for m in means], [m[1] for m in means], "k*-", ms=11, lw=1.5, label="model mean")
        if len(means) > 1:
            for x, y, step in means:
                if step is not None:
                    ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for k in kinds:
        ax.scatter([], [], color=colors[k], s=18, label=k)
    ax.axvline(0.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("Ramanujan gap  $\\Delta_r = \\sqrt{\\bar d_l-1}+\\sqrt{\\bar d_r-1}-\\hat\\mu$")
    ax.set_ylabel("weighted spectral gap  $\\lambda = \\mu_0 - \\hat\\mu$  (|W|)" if ykey == "lambda"
                  else "$\\Delta_s = 2\\sqrt{\\mu_0-1}-\\hat\\mu$  (no weights saved)")
    steps = [run["step"] for run in runs if run["step"] is not None]
    ax.set_title("mask topology per layer" + (f", steps {min(steps)}..{max(steps)}" if len(runs) > 1 and steps else ""))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return out


def plot_steps(runs: list[dict], path: str | os.PathLike) -> Path:
    """Model-mean (bold) and per-layer (thin) metrics against the training step of each checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [run["step"] if run["step"] is not None else i for i, run in enumerate(runs)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, key in zip(axes.ravel(), STEP_PLOT):
        for name in [r["name"] for r in runs[-1]["layers"]]:
            ys = [next((r[key] for r in run["layers"] if r["name"] == name), None) for run in runs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], "-", lw=0.6, alpha=0.3)
        ys = [run["model"].get(key) for run in runs]
        ax.plot(xs, [math.nan if y is None else y for y in ys], "ko-", lw=2, label="model mean")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step" if all(r["step"] is not None for r in runs) else "checkpoint")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return out


def steps_plot_path(plot: str | os.PathLike) -> Path:
    p = Path(plot)
    return p.with_name(f"{p.stem}_steps{p.suffix or '.png'}")


class _Progress:
    """`[k/n] layer` on one rewritten stderr line, only on a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0

    def __call__(self, name: str, rec: dict) -> None:
        self.done += 1
        if self.enabled:
            print(f"\r[{self.done}/{self.total}] {name[-60:]:<60}", end="", file=sys.stderr, flush=True)


def run(checkpoints: list[str], *, json_out: str | None = None, csv_out: str | None = None,
        plot_out: str | None = None, iterative: bool = True, convention: str = "neurips23",
        jobs: int = 1, quiet: bool = False) -> list[dict]:
    """Analyse each checkpoint, print the tables, write the requested files; returns the per-checkpoint
    results. Every checkpoint is opened (and fails) before any analysis starts."""
    from sift_megatron.preflight import check_writable_file
    from sift_megatron.spectral.io import open_masks

    for flag, out in (("--json", json_out), ("--csv", csv_out), ("--plot", plot_out)):
        if out:
            check_writable_file(out, flag)
    if plot_out and len(checkpoints) > 1:
        check_writable_file(steps_plot_path(plot_out), "--plot (steps plot)")
    opened = [(c, *open_masks(c)) for c in checkpoints]
    tty = sys.stderr.isatty() and not quiet
    runs = []
    for ckpt, step, masks in opened:
        t0 = time.perf_counter()
        res = analyze_masks(masks, iterative, convention=convention, jobs=jobs,
                            progress=_Progress(len(masks), tty))
        if tty:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
        res.update(checkpoint=str(ckpt), file=str(masks.path), step=step, seconds=round(time.perf_counter() - t0, 3))
        runs.append(res)
        if not quiet:
            print(f"# {ckpt}  (step {_fmt(step)}, {len(masks)} sparse layers, convention {convention}, "
                  f"{res['seconds']:.1f}s)")
            print(layer_table(res))
            print()
    if len(runs) > 1:
        runs.sort(key=lambda r: (r["step"] is None, r["step"] or 0))
        if not quiet:
            print(trend_table(runs))
            print()
    written = []
    if json_out:
        written.append(write_json(runs, json_out, convention, iterative))
    if csv_out:
        written.append(write_csv(runs, csv_out))
    if plot_out:
        written.append(plot_plane(runs, plot_out))
        if len(runs) > 1:
            written.append(plot_steps(runs, steps_plot_path(plot_out)))
    for p in written:
        print(f"wrote {p}")
    return runs
