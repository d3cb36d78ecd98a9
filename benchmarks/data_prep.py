"""Data-prep pipeline efficiency: `sift data preprocess` tokens/s with W workers divided by W x the raw
single-process sentencepiece encode rate on the same text (goal >= 0.85 for W = 1 and 2).

The corpus is the built-in default corpus (this Python's standard library source) repeated into a
jsonl file of at least --min-mb MB, so nothing is downloaded. Each measurement is repeated and the
fastest run kept (the machine may be shared); raw and pipeline runs are interleaved so load drift hits
both. The one-time megatron import is excluded from pipeline time (it is a fixed start-up cost, printed
separately). On a shared machine wall-clock ratios move with other jobs, so the script also prints the
machine's ceiling (W concurrent bare encoders vs W x raw) and a CPU-time efficiency (raw encode CPU /
pipeline CPU summed over all processes), which is insensitive to other load. Last line: one JSON object.

    python benchmarks/data_prep.py [--min-mb 20] [--vocab-size 8000] [--repeats 2] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.corpus import default_corpus_files  # noqa: E402
from data_prep.preprocess import preprocess  # noqa: E402
from data_prep.trainer import MODEL_FILE, train_tokenizer  # noqa: E402


def build_corpus(path: Path, min_bytes: int) -> list[str]:
    """Write the default corpus, repeated, as jsonl (one document per source file); return the texts."""
    base = [f.read_text(encoding="utf-8", errors="replace") for f in default_corpus_files()]
    docs: list[str] = []
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < min_bytes:
            for text in base:
                f.write(json.dumps({"text": text}) + "\n")
                docs.append(text)
                size += len(text.encode("utf-8"))
    return docs


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def raw_encode_seconds(model: Path, docs: list[str]) -> tuple[float, float, int]:
    """One process, one thread, plain sentencepiece batch encode of every document: (wall, cpu, tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, cpu = time.perf_counter(), cpu_seconds()
    ids = sp.encode(docs, out_type="numpy", num_threads=1)
    return time.perf_counter() - start, cpu_seconds() - cpu, sum(a.size for a in ids)


_DOCS: list[str] = []


def _encode_all(model: str) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    return sum(a.size for a in sp.encode(_DOCS, out_type="numpy", num_threads=1))


def raw_concurrent_seconds(model: Path, docs: list[str], w: int) -> float:
    """Wall time for W forked processes that each encode the whole corpus at once (no I/O, no IPC).
    raw time / this = how much of W x raw the machine delivers right now (shared caches and memory
    bandwidth, other jobs on the cores): the ceiling for any W-worker pipeline."""
    import multiprocessing

    _DOCS[:] = docs
    with multiprocessing.get_context("fork").Pool(w) as pool:
        pool.map(abs, range(w))  # workers up before timing
        start = time.perf_counter()
        pool.map(_encode_all, [str(model)] * w, chunksize=1)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401
    import_seconds = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="sift-bench-data-") as tmp_str:
        tmp = Path(tmp_str)
        corpus = tmp / "corpus.jsonl"
        docs = build_corpus(corpus, int(args.min_mb * 1e6))
        nbytes = corpus.stat().st_size
        print(f"corpus: {len(docs):,} documents, {nbytes / 1e6:.1f} MB jsonl "
              f"({sum(map(len, docs)) / 1e6:.1f} M chars)")
        t = time.perf_counter()
        train_tokenizer(["default:8MB"], args.vocab_size, tmp / "tok", seed=0)
        print(f"tokenizer: bpe vocab {args.vocab_size} trained on default:8MB "
              f"in {time.perf_counter() - t:.1f} s")
        (tmp / "out").mkdir()

        raw_s: list[float] = []
        pipe_s: dict[int, list[float]] = {w: [] for w in args.workers}
        ceil_s: dict[int, list[float]] = {w: [] for w in args.workers if w > 1}
        raw_cpu: list[float] = []
        pipe_cpu: dict[int, list[float]] = {w: [] for w in args.workers}
        raw_tokens = 0
        pipe_tokens = 0
        for rep in range(args.repeats):
            seconds, cpu, raw_tokens = raw_encode_seconds(tmp / "tok" / MODEL_FILE, docs)
            raw_s.append(seconds)
            raw_cpu.append(cpu)
            print(f"[{rep}] raw encode: {raw_tokens / seconds:,.0f} tokens/s ({seconds:.2f} s)")
            for w in ceil_s:
                ceil_s[w].append(raw_concurrent_seconds(tmp / "tok" / MODEL_FILE, docs, w))
                print(f"[{rep}] raw encode in {w} concurrent processes: "
                      f"{w * raw_tokens / ceil_s[w][-1]:,.0f} tokens/s")
            for w in args.workers:
                cpu = cpu_seconds()
                s = preprocess([str(corpus)], tmp / "tok", tmp / "out" / f"w{w}", workers=w, progress=False)
                pipe_cpu[w].append(cpu_seconds() - cpu)
                pipe_s[w].append(s.seconds)
                pipe_tokens = s.tokens
                print(f"[{rep}] pipeline W={w}: {s.tokens / s.seconds:,.0f} tokens/s ({s.seconds:.2f} s)")
        assert pipe_tokens == raw_tokens + len(docs), "pipeline tokens must be raw tokens + one EOD per doc"
        first = (tmp / "out" / f"w{args.workers[0]}.bin").read_bytes()
        same = [(tmp / "out" / f"w{w}.bin").read_bytes() == first for w in args.workers]

    raw_rate = raw_tokens / min(raw_s)
    result: dict[str, float | int | bool] = {"raw_tokens_per_s": round(raw_rate)}
    print(f"\nraw single-process encode: {raw_rate:,.0f} tokens/s (best of {args.repeats})")
    for w in args.workers:
        rate = raw_tokens / min(pipe_s[w])  # count the same tokens as raw (EOD excluded)
        eff = rate / (w * raw_rate)
        print(f"pipeline W={w}: {rate:,.0f} tokens/s  efficiency pipeline/(W x raw) = {eff:.3f}")
        result[f"pipeline_tokens_per_s_w{w}"] = round(rate)
        result[f"efficiency_w{w}"] = round(eff, 3)
        result[f"data_prep_efficiency_w{w}"] = round(eff, 3)
        cpu_eff = min(raw_cpu) / min(pipe_cpu[w])
        print(f"  CPU-time efficiency raw cpu / pipeline cpu (all processes) = {cpu_eff:.3f}")
        result[f"cpu_efficiency_w{w}"] = round(cpu_eff, 3)
        if w in ceil_s:
            ceiling = w * raw_tokens / min(ceil_s[w]) / (w * raw_rate)
            print(f"  machine ceiling (W concurrent bare encoders)/(W x raw) = {ceiling:.3f}")
            result[f"machine_ceiling_w{w}"] = round(ceiling, 3)
    print(f"megatron import (fixed start-up cost, excluded above): {import_seconds:.1f} s")
    result.update({"corpus_mb": round(nbytes / 1e6, 1), "documents": len(docs), "tokens": raw_tokens,
                   "vocab_size": args.vocab_size, "outputs_identical_across_workers": all(same),
                   "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
