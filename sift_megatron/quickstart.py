"""`sift quickstart [--out DIR]`: the main job, end to end on the built-in corpus.

1. train a sentencepiece tokenizer and build Megatron shards from the default corpus (this Python's standard
   library source: present on every machine, no download);
2. train, under torchrun with 2 ranks and TP=2, a dense tiny GPT and two Sparse-IFT models at equal
   transformed-layer FLOPs: Sparse Wide s=0.5 (static mask) and Sparse Wide s=0.75 (RigL), same steps/tokens;
   then a dense model widened to the best sparse run's whole-model training FLOPs (its widened embedding,
   attention and LM head cost more than the dense baseline's), so the headline is also read against dense
   at equal whole-model FLOPs;
3. print and save a comparison table (validation loss / perplexity, FLOPs per token of the transformed
   layers and of the whole model, active / stored parameters, wall time), a loss-curve plot and a Markdown
   summary; export the best sparse model to Hugging Face format and write a spectral report of its masks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "quickstart.yaml"
RUNS = {
    "dense": [],
    "sparse_wide_s50_static": ["sparsity.family=wide", "sparsity.s=0.5", "sparsity.exact_iso=true"],
    "sparse_wide_s75_rigl": ["sparsity.family=wide", "sparsity.s=0.75", "sparsity.exact_iso=true",
                             "dst.algorithm=rigl", "dst.interval=25", "dst.end=0.75", "dst.drop_fraction=0.3"],
}
ISO_TOTAL = "dense_same_total_flops"  # dense widened to the best sparse run's whole-model training FLOPs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the main job: tokenizer, shards, dense vs Sparse-IFT, export, spectra")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (TP degree), default 2")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    p.add_argument("--corpus-size", default="6MB", help="bytes of the built-in corpus to use (default 6MB)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.set_defaults(func=_quickstart)


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _run(cmd: list[str], log: Path | None = None) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=log is not None, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        from sift_megatron.errors import SiftError

        tail = (proc.stderr or "").strip().splitlines()[-1:] if log is not None else []
        raise SiftError(f"step failed ({' '.join(cmd[2:5])}...): {tail[0] if tail else 'see output above'}"
                        + (f"; log: {log}" if log else ""))


def free_port() -> int:
    """A free local TCP port (the rendezvous of runs started side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(name: str, overrides: list[str], out: Path, data: dict, nproc: int, steps: int | None, *,
           port: int | None = None, echo: bool = True) -> dict:
    """One `sift train` run, under torchrun when nproc > 1; port: its rendezvous port (runs side by side need
    distinct ones); echo: stream one line per logged step (else only stdout.log)."""
    run_dir = out / "runs" / name
    args = [str(CONFIG), f"train.out_dir={run_dir}", f"parallel.tensor={nproc}",
            f"data.prefixes=[{data['train']}]", f"data.valid_prefixes=[{data['valid']}]",
            f"data.tokenizer={data['tokenizer']}", "train.overwrite=true", *overrides]
    if steps:  # short runs: log often enough for a curve, validate at least at the end
        args += [f"train.steps={steps}", f"logging.log_interval={max(1, min(10, steps // 10))}"]
    from sift_megatron.config import load_config

    cfg = load_config(args[0], args[1:])
    # one rank: plain `sift train` (no torchrun agent: ~1.5 s less start-up per run, which short studies feel)
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                    "--master_addr=127.0.0.1", f"--master_port={port or 29800 + abs(hash(name)) % 500}"]
    cmd = [sys.executable, *launch, "-m", "sift_megatron.cli", "train", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # stream progress: one line per logged step
        lines.append(line)
        if echo and line.startswith(("loss=", "step=")):
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            shown = " ".join(f"{k}={fields[k]}" for k in ("step", "loss", "val_loss", "dst/changed") if k in fields)
            print(f"  [{name}] {shown}", flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    (run_dir / "stdout.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "stdout.log").write_text("".join(lines))
    if rc:
        from sift_megatron.errors import SiftError

        raise SiftError(f"training run {name} failed (exit {rc}); log: {run_dir / 'stdout.log'}")
    return {"name": name, "dir": run_dir, "cfg": cfg, "wall_s": wall}


def prepare_data(out: Path, corpus: str, vocab_size: int) -> dict:
    """Tokenizer + train/valid shards of `corpus` under `out` (reused when already there)."""
    out.mkdir(parents=True, exist_ok=True)
    tok, prefix = out / "tokenizer", out / "data" / "corpus"
    if not (tok / "tokenizer.model").exists():
        _say(f"1/5 training a {vocab_size}-token sentencepiece tokenizer on the built-in corpus ({corpus})")
        _run([sys.executable, "-m", "sift_megatron.cli", "data", "tokenizer", "--input", corpus, "--vocab-size",
              str(vocab_size), "--out", str(tok)])
    if not Path(f"{prefix}_train.idx").exists():
        _say("2/5 tokenizing the corpus into Megatron .bin/.idx shards")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "sift_megatron.cli", "data", "preprocess", "--input", corpus, "--tokenizer",
              str(tok), "--out", str(prefix), "--workers", "2", "--split", "98,2,0"])
    return {"train": f"{prefix}_train", "valid": f"{prefix}_valid", "tokenizer": str(tok)}


def _metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in open(run_dir / "metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    return train, val


def _params(run_dir: Path) -> tuple[int, int]:
    """(stored, active) parameters of the run's final checkpoint: masked weights are stored but not active."""
    import math

    from sift_megatron.convert.source import load_source

    t = load_source(run_dir).tensors  # reads only the masks
    stored = active = 0
    for k, shape in t.shapes.items():
        if k.endswith(".mask"):
            continue
        stored += math.prod(shape)
        mk = k[: -len("weight")] + "mask" if k.endswith("weight") else None
        active += int(t[mk].sum()) if mk in t else math.prod(shape)
    return stored, active


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        line, = ax.plot(*zip(*r["train"]), alpha=0.5, lw=1) if r["train"] else ax.plot([], [])
        ax.plot(*zip(*r["val"]), "o-", color=line.get_color(), label=f"{r['name']} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Dense vs Sparse-IFT (Sparse Wide); dense_same_total_flops: equal whole-model FLOPs",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _table(results: list[dict]) -> str:
    head = ("| run | val loss | val ppl | transformed-layer MFLOPs/token | whole-model MFLOPs/token | "
            "whole-run training TFLOPs | params active / stored | wall time |")
    rows = [head, "|" + "---|" * 8]
    for r in results:
        rows.append(f"| {r['name']} | {r['val_loss']:.4f} | {r['ppl']:.2f} | {r['flops_transformed'] / 1e6:.3f} | "
                    f"{r['flops_total'] / 1e6:.3f} | {r['train_flops'] / 1e12:.2f} | "
                    f"{r['active'] / 1e6:.3f}M / {r['stored'] / 1e6:.3f}M | {r['wall_s']:.0f} s |")
    return "\n".join(rows)


def _measure(name: str, overrides: list[str], out: Path, data: dict, nproc: int, steps: int | None) -> dict:
    """Train one run and collect its table row: losses, FLOPs (per token and for the whole run), parameters."""
    from sift_megatron.ift.flops import flop_report

    r = _train(name, overrides, out, data, nproc, steps)
    r["train"], r["val"] = _metrics(r["dir"])
    r["val_loss"] = r["val"][-1][1]
    r["ppl"] = math.exp(r["val_loss"])
    rep = flop_report(r["cfg"])
    r["flops_transformed"] = rep["transformed"]["transformed_layers"]
    r["flops_total"] = rep["transformed"]["total"]
    t = r["cfg"].train
    r["train_flops"] = rep["transformed"]["training"]["per_token"] * t.steps * t.global_batch_size * r["cfg"].model.seq_length
    r["hidden_size"] = rep["shape"]["transformed"]["hidden_size"]
    r["stored"], r["active"] = _params(r["dir"])
    return r


def _quickstart(args: argparse.Namespace) -> int:
    from sift_megatron.extras import require

    require("sift quickstart", "transformers", "google.protobuf", "scipy", "matplotlib")
    from sift_megatron.config import atomic_write_text
    from sift_megatron.ift.flops import dense_width_for_training_flops, training_flops_per_token

    out = Path(args.out)
    t_start = time.perf_counter()
    corpus = f"default:{args.corpus_size}"
    data = prepare_data(out, corpus, args.vocab_size)

    results = []
    n_runs = len(RUNS) + 1
    for i, (name, overrides) in enumerate(RUNS.items()):
        _say(f"3/5 training {name} ({i + 1}/{n_runs}) under torchrun, {args.nproc} ranks, TP={args.nproc}")
        results.append(_measure(name, overrides, out, data, args.nproc, args.steps))
    best = min((r for r in results if r["name"] != "dense"), key=lambda r: r["val_loss"])
    dense = next(r for r in results if r["name"] == "dense")
    # dense at the best sparse run's whole-model training FLOPs (same tokens): the dense-frontier comparison
    width = dense_width_for_training_flops(dense["cfg"], training_flops_per_token(best["cfg"]))
    _say(f"3/5 training {ISO_TOTAL} ({n_runs}/{n_runs}): dense at hidden {width}, the whole-model training FLOPs "
         f"of {best['name']}")
    results.append(_measure(ISO_TOTAL, [f"model.hidden_size={width}"], out, data, args.nproc, args.steps))
    iso_total = results[-1]

    _say("4/5 comparison")
    table = _table(results)
    print(table, flush=True)
    _plot(results, out / "loss_curves.png")

    _say(f"5/5 exporting {best['name']} to Hugging Face format and analysing its mask spectra")
    hf_dir = out / "hf" / best["name"]
    _run([sys.executable, "-m", "sift_megatron.cli", "convert", str(best["dir"]), "--to", "hf", "--out", str(hf_dir)])
    spectral_json = out / "spectral" / f"{best['name']}.json"
    spectral_png = out / "spectral" / f"{best['name']}.png"
    spectral_json.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "sift_megatron.cli", "spectral", str(best["dir"]), "--json", str(spectral_json),
          "--plot", str(spectral_png)])

    delta = best["val_loss"] - dense["val_loss"]
    delta_total = best["val_loss"] - iso_total["val_loss"]
    flop_ratio = best["train_flops"] / iso_total["train_flops"]
    summary = "\n".join([
        "# sift quickstart", "",
        f"Corpus: built-in ({corpus} of this Python's standard library), tokenizer vocab {args.vocab_size}; "
        f"{args.nproc} ranks, TP={args.nproc}; {results[0]['cfg'].train.steps} steps x "
        f"{results[0]['cfg'].train.global_batch_size} sequences x {results[0]['cfg'].model.seq_length} tokens per run.",
        "", table, "",
        f"Best Sparse-IFT run: **{best['name']}**, validation loss {best['val_loss']:.4f}: vs dense at equal "
        f"transformed-layer FLOPs {dense['val_loss']:.4f} ({delta:+.4f}); vs dense at equal whole-model training "
        f"FLOPs ({ISO_TOTAL}, hidden {iso_total['hidden_size']}, {flop_ratio:.3f}x its FLOPs) "
        f"{iso_total['val_loss']:.4f} ({delta_total:+.4f}). "
        + ("It beats both." if delta < 0 and delta_total < 0 else
           "It beats dense only at equal transformed-layer FLOPs: the widened model's extra embedding, attention "
           "and LM-head FLOPs buy as much." if delta < 0 else "It does not beat dense."),
        "", "Artefacts:", f"- loss curves: `{out / 'loss_curves.png'}`",
        f"- Hugging Face export: `{hf_dir}`", f"- spectral report: `{spectral_json}`, `{spectral_png}`",
        f"- runs (metrics.jsonl, TensorBoard, checkpoints): `{out / 'runs'}`",
        "", f"Total wall time: {time.perf_counter() - t_start:.0f} s."])
    atomic_write_text(out / "SUMMARY.md", summary + "\n")
    atomic_write_text(out / "results.json", json.dumps([
        {k: v for k, v in r.items() if k not in ("cfg", "dir", "train", "val")} | {"val": r["val"]}
        for r in results], indent=1))
    _say(f"done in {time.perf_counter() - t_start:.0f} s: {out / 'SUMMARY.md'}")
    return 0
