"""Loading never runs code (issue 15, item 3): a pickle payload planted in every file of a checkpoint and of
the data index cache never executes. Each run either never reads the file (it is rewritten or rebuilt
later) or stops with a one-line error naming it; the test then restores that one file and runs again,
until the run goes through, so every file that is read is shown to be refused on its own."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_sift
from tests.test_training_data import _corpus

TINY = str(REPO / "configs" / "tiny" / "dense.yaml")
RUN = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl", "dst.interval=1", "train.save_interval=2",
       "logging.progress=false", "logging.tensorboard=false", "zero.stage0_when_single_replica=false"]


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    """A pickle payload in the file's own format where it has one (torch.save for .pt; for a DCP data file,
    torch.save records at its own length, so that its index still covers it), raw pickle bytes otherwise (what
    numpy.load(allow_pickle=True) falls back to for a file that is not .npy)."""
    if path.suffix == ".pt":
        torch.save({"state": _Payload(marker)}, path)
    elif path.suffix == ".distcp":
        import io

        buf = io.BytesIO()
        torch.save({"state": _Payload(marker)}, buf)
        size = path.stat().st_size
        path.write_bytes((buf.getvalue() * (size // len(buf.getvalue()) + 1))[:size])
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))


def _check_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()  # the payload does run when unpickled
    marker.unlink()


def _refuse_one_by_one(files: list[Path], marker: Path, attempt) -> list[str]:
    """Plant every file; attempt() -> (returncode, one-line error). Restore the file each error names, retry.
    Returns the names of the files that were read (and refused), in order."""
    originals = {f: f.read_bytes() for f in files}
    for f in files:
        _plant(f, marker)
    refused = []
    for _ in range(len(files) + 1):
        rc, err = attempt()
        assert not marker.exists(), f"payload ran (after refusing {refused})"
        if rc == 0:
            return refused
        hit = [f for f in files if f.name in err]
        assert len(hit) == 1 and hit[0].name not in refused, err
        refused.append(hit[0].name)
        hit[0].write_bytes(originals[hit[0]])
    raise AssertionError(f"never got through: refused {refused}")


def _checkpoint_refusals(ckpt: Path, out: Path) -> dict:
    """Build the trainer once and resume from the planted checkpoint through the trainer's own load path until it
    goes through (in one process: one torch/megatron import, not one per file)."""
    from sift_megatron.config import load_config
    from sift_megatron.errors import SiftError
    from sift_megatron.training.trainer import Trainer

    trainer = Trainer(load_config(TINY, [f"train.out_dir={out}", "train.steps=3", *RUN]))

    def attempt():
        try:
            msg = trainer.checkpoints.load(ckpt)
        except SiftError as e:
            assert len(str(e).splitlines()) == 1, str(e)
            return 1, str(e)
        assert msg.startswith("resumed from") and trainer.state.step == 2, msg
        return 0, ""

    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    refused = _refuse_one_by_one(files, out / "PWNED", attempt)
    trainer.close()
    return {"files": [f.name for f in files], "refused": refused}


@pytest.mark.slow
def test_planted_pickle_in_checkpoint_never_runs(tmp_path):
    """A same-layout ZeRO-1 RigL checkpoint (DCP data file with torch.save records, its JSON index, meta.json)."""
    _check_payload_is_live(tmp_path)
    run_sift(["train", TINY, f"train.out_dir={tmp_path / 'run'}", "train.steps=2", *RUN])
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    got = _in_subprocess("checkpoint", ckpt, tmp_path)
    print("refused, in order:", got["refused"])
    assert not (tmp_path / "PWNED").exists()
    pickled = {"__0_0.distcp"}  # model, masks, Adam state and RNG: torch.save records read with weights_only
    assert pickled <= set(got["files"])
    # Every file the same-layout resume reads was refused on its own (the rest are never read).
    assert pickled | {"dcp.json", "meta.json"} <= set(got["refused"])
    # The CLI stops at the first planted file with one line.
    for f in ckpt.iterdir():
        _plant(f, tmp_path / "PWNED")
    proc = run_sift(["train", TINY, f"train.out_dir={tmp_path / 'resumed'}", "train.steps=3", *RUN,
                     f"train.resume={ckpt}"], check=False)
    assert not (tmp_path / "PWNED").exists()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line, = proc.stderr.strip().splitlines()
    assert str(ckpt) in line


def _in_subprocess(what: str, *args: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.test_no_pickle", what, *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _data_cache_refusals(tmp: Path) -> dict:
    """Build a blend's datasets exactly as training does, plant every file of the index cache, and rebuild
    until it goes through (in one process: one torch/megatron import, not one per file)."""
    from sift_megatron import platform
    from sift_megatron.config import load_config
    from sift_megatron.errors import SiftError
    from sift_megatron.training.data import build_datasets

    platform.init_distributed()  # with the tensors-only loaders, as in every sift process
    over = ["data.mock=false", "model.vocab_size=200", "data.split=90,10,0",
            f"data.prefixes=[0.7, {tmp / 'a'}, 0.3, {tmp / 'b'}]", f"train.out_dir={tmp / 'r'}"]

    def attempt():
        try:
            build_datasets(load_config(TINY, over), None, tmp / "r", 16, 8)
        except SiftError as e:
            assert len(str(e).splitlines()) == 1, str(e)
            return 1, str(e)
        return 0, ""

    assert attempt()[0] == 0
    cache = sorted((tmp / "r" / "data_cache").iterdir())
    refused = _refuse_one_by_one(cache, tmp / "PWNED", attempt)
    return {"files": [f.name for f in cache], "refused": refused}


@pytest.mark.slow
def test_planted_pickle_in_data_cache_never_runs(tmp_path):
    """Megatron's index cache of a blend (GPTDataset and BlendedDataset indices, train and valid splits)."""
    _check_payload_is_live(tmp_path)
    for name, seed in (("a", 0), ("b", 1)):
        _corpus(tmp_path / name, seed)
    got = _in_subprocess("data_cache", tmp_path)
    print("refused, in order:", got["refused"])
    assert not (tmp_path / "PWNED").exists()
    npy = [f for f in got["files"] if f.endswith(".npy")]
    assert len(npy) == 16  # 2 prefixes x 2 splits x (document, sample, shuffle) + 2 splits x blend (2)
    assert set(npy) <= set(got["refused"])
    # The CLI stops at the first planted file with the same one line.
    cache = tmp_path / "r" / "data_cache"
    for f in cache.iterdir():
        _plant(f, tmp_path / "PWNED")
    proc = run_sift(["train", TINY, "data.mock=false", "model.vocab_size=200", "data.split=90,10,0",
                     f"data.prefixes=[0.7, {tmp_path / 'a'}, 0.3, {tmp_path / 'b'}]", f"train.out_dir={tmp_path / 'r'}",
                     "train.steps=1", "train.save=false", "logging.progress=false"], check=False)
    assert not (tmp_path / "PWNED").exists()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line, = proc.stderr.strip().splitlines()
    assert "data cache file" in line and "delete it" in line


if __name__ == "__main__":
    fn = {"checkpoint": _checkpoint_refusals, "data_cache": _data_cache_refusals}[sys.argv[1]]
    print(json.dumps(fn(*map(Path, sys.argv[2:]))))
