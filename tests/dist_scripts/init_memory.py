"""Run under torchrun with 4 ranks: build the same model at TP=4, TP=2 and TP=1 (DP = 4 / TP), save its sharded
checkpoint (training/checkpoint.model_state through shards.save) and load it back, and measure each rank's peak
host RSS in each phase above its RSS before the model was built (the kernel's high-water mark, reset through
/proc/self/clear_refs): what the rank holds (its shard) plus what the phase adds. Also gathers three weights
(column-parallel, row-parallel, vocab-parallel) at their logical shapes, to check that every TP degree draws
bit-identical logical weights, and checks that the load restores every weight (zeroed before it).
Rank 0 prints one JSON line: {"init_rss_mb" / "save_rss_mb" / "load_rss_mb": {tp: max over ranks},
"save_s": {tp: s}, "save_bytes": {tp: bytes}, "raw_write_s": {tp: s}, "model_mb": ..., "same_weights": bool,
"loaded_exactly": bool}; raw_write_s is one process writing the same bytes sequentially (+ fsync) to the same
filesystem, in this run.

Usage: init_memory.py [OVERRIDE ...] (config overrides of the model; defaults below). Checkpoints go to
$SIFT_CKPT_DIR (default: a temporary directory)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
MODEL = ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8", "model.vocab_size=16384",
         "model.seq_length=64"]
CHECK = ("decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.7.mlp.linear_fc2.weight",
         "embedding.word_embeddings.weight")


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    from sift_megatron import platform

    platform.init_distributed()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from sift_megatron import shards
    from sift_megatron.config import load_config
    from sift_megatron.models.gpt import build_model
    from sift_megatron.sharding import gather_tp, global_param_names
    from sift_megatron.training.checkpoint import model_state

    libc = ctypes.CDLL("libc.so.6")
    out, logical = {}, {}
    phases: dict[str, dict] = {"save_rss_mb": {}, "load_rss_mb": {}, "save_s": {}, "save_bytes": {}, "raw_write_s": {}}
    same = loaded = True
    model_bytes = 0
    root = [os.environ.get("SIFT_CKPT_DIR") or (tempfile.mkdtemp() if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(root)
    root = Path(root[0])

    def peak_since(base: int) -> float:
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, _status_kb("VmHWM") - base)
        return max(peaks) / 1024

    def reset() -> None:
        gc.collect()
        libc.malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
    # A first, tiny build imports what building needs, so no phase counts import-time memory. Then the smallest
    # shards first: memory freed by a phase and reused by the next can only make TP=1 look smaller.
    for tp in ("warmup", 4, 2, 1):
        warmup = tp == "warmup"
        tp = 4 if warmup else tp
        over = [*MODEL, *sys.argv[1:]] if not warmup else ["model.vocab_size=256"]
        cfg = load_config(REPO / "configs" / "tiny" / "dense.yaml", [*over, f"parallel.tensor={tp}"])
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        reset()  # VmHWM := the current RSS
        before = _status_kb("VmRSS")
        chunks = build_model(cfg, cfg.model.vocab_size)
        peak = _status_kb("VmHWM") - before
        if warmup:
            shards.save(model_state(chunks), root / "warmup")  # imports what saving needs
            del chunks
            ps.destroy_model_parallel()
            continue
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        out[tp] = max(peaks) / 1024
        # save: every rank writes its own shards
        sums = [float(p.double().square().sum()) for p in chunks[0].parameters()]
        dist.barrier()
        reset()
        t0 = time.perf_counter()
        shards.save(model_state(chunks), root / f"tp{tp}")
        dist.barrier()
        phases["save_s"][tp] = time.perf_counter() - t0
        phases["save_rss_mb"][tp] = peak_since(before)
        phases["save_bytes"][tp] = sum(f.stat().st_size for f in (root / f"tp{tp}").glob("*.distcp"))
        # load into zeroed weights
        for p in chunks[0].parameters():
            p.data.zero_()
        dist.barrier()
        reset()
        shards.load(model_state(chunks), root / f"tp{tp}")
        phases["load_rss_mb"][tp] = peak_since(before)
        loaded &= sums == [float(p.double().square().sum()) for p in chunks[0].parameters()]
        # the same bytes written by one process, sequentially
        dist.barrier()
        if dist.get_rank() == 0:
            block = os.urandom(1 << 22)
            t0 = time.perf_counter()
            with open(root / "raw.bin", "wb") as f:
                for _ in range(-(-phases["save_bytes"][tp] // len(block))):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            phases["raw_write_s"][tp] = time.perf_counter() - t0
            (root / "raw.bin").unlink()
        dist.barrier()
        params = dict(global_param_names(chunks[0]))
        if tp == 1:
            model_bytes = sum(p.numel() * p.element_size() for p in chunks[0].parameters())
        for name in CHECK:
            p = params[name]
            full = gather_tp(p.data, p.partition_dim) if getattr(p, "tensor_model_parallel", False) else p.data
            if name in logical:
                same &= torch.equal(logical[name], full)
            else:
                logical[name] = full.clone()
        del chunks, params, full, p
        ps.destroy_model_parallel()
        if dist.get_rank() == 0:
            shutil.rmtree(root / f"tp{tp}", ignore_errors=True)
    if dist.get_rank() == 0:
        print(json.dumps({"init_rss_mb": out, **phases, "model_mb": model_bytes / 2**20, "same_weights": bool(same),
                          "loaded_exactly": bool(loaded)}))
        if not os.environ.get("SIFT_CKPT_DIR"):
            shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
