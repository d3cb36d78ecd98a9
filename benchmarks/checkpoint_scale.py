"""Sharded checkpoints at TP=1, 2 and 4 (4 ranks, DP = 4 / TP): peak host RSS per rank during save and load
relative to TP=1, and the checkpoint write rate relative to one process writing the same bytes sequentially to
the same filesystem, measured in the same run (issue 15's must-show).

Prints one JSON line: save_peak_rss_tp4_over_tp1, load_peak_rss_tp4_over_tp1 (goal <= 0.35: memory follows the
shard), save_gbps_over_disk_gbps (goal >= 0.5; at TP=4, every rank writing its shards) and the raw figures.
The model is tests/dist_scripts/init_memory.py's (33.6M parameters, 128 MB fp32); --hidden/--layers/--vocab
change it.

    python benchmarks/checkpoint_scale.py [--hidden 512] [--layers 8] [--vocab 16384] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import REPO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dir", help="where the checkpoints go (default: a temporary directory)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
               "--master_port=29631", str(REPO / "tests" / "dist_scripts" / "init_memory.py"),
               f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}", f"model.vocab_size={a.vocab}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIFT_CKPT_DIR": d, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"checkpoint_scale failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    got = json.loads(lines[-1])

    def at(key: str, tp: int) -> float:
        return got[key][str(tp)]

    save_gbps = at("save_bytes", 4) / at("save_s", 4) / 2**30
    disk_gbps = at("save_bytes", 4) / at("raw_write_s", 4) / 2**30
    print(json.dumps({
        "save_peak_rss_tp4_over_tp1": at("save_rss_mb", 4) / at("save_rss_mb", 1),
        "load_peak_rss_tp4_over_tp1": at("load_rss_mb", 4) / at("load_rss_mb", 1),
        "init_peak_rss_tp4_over_tp1": at("init_rss_mb", 4) / at("init_rss_mb", 1),
        "save_gbps_over_disk_gbps": save_gbps / disk_gbps,
        "save_gbps": save_gbps, "disk_gbps": disk_gbps, "model_mb": got["model_mb"],
        "rss_mb": {k: got[k] for k in ("init_rss_mb", "save_rss_mb", "load_rss_mb")},
        "loaded_exactly": got["loaded_exactly"]}))


if __name__ == "__main__":
    main()
