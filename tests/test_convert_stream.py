"""`sift convert` streams: a checkpoint far larger than one tensor converts with peak memory of about one
shard plus the largest tensor, into transformers' sharded layout, with correct sparsity stats.

The checkpoints are synthetic (no training): a wide Sparse Wide model (hidden 768 -> 1088 at s=0.5, 4
layers, 286 MB with its uint8 masks) and a Sparse Doped one (hidden 1024, 354 MB; W_s + V U is folded
block by block), written with the names and shapes `sift train` writes, as convert/source.py validates
them. The conversion runs in a fresh process whose peak RSS is reset after the imports
(/proc/self/clear_refs), so the measured growth is the conversion's own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SHARD = 32 * 2**20

CHILD = r"""
import json, os, resource, sys
import torch, transformers, safetensors.torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
import data_prep.atomic, sift_megatron.preflight, sift_megatron.config, sift_megatron.ift.sizes
from sift_megatron.convert.hf import export_hf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    reset = True
except OSError:  # without it the peak since start is used: an over-estimate, never an under-estimate
    reset = False
export_hf(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))
print(json.dumps({"base": base, "peak": status("VmHWM"), "reset": reset}))
"""


FAMILIES = {"wide": 768, "doped": 1024}  # base hidden size: >= 200 MB of weights either way


def _synthetic_run(run: Path, family: str, hidden: int | None = None) -> dict:
    """config.yaml + model.safetensors of a wide-hidden Sparse Wide or Doped model at s=0.5; returns
    name -> tensor."""
    import torch
    from safetensors.torch import save_file

    from sift_megatron.config import load_config
    from sift_megatron.convert.source import expected_shapes
    from sift_megatron.ift.sizes import transformed_shape

    run.mkdir()
    d = yaml.safe_load((REPO / "configs" / "tiny" / "dense.yaml").read_text())
    d["model"].update(hidden_size=hidden or FAMILIES[family], num_attention_heads=8)
    d["sparsity"] = {"family": family, "s": 0.5}
    (run / "config.yaml").write_text(yaml.safe_dump(d))
    cfg = load_config(run / "config.yaml")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_shapes(cfg, transformed_shape(cfg), 256).items():
        w = torch.randn(shape, generator=g)
        sparse = name.endswith(".sparse.weight") if family == "doped" else len(shape) == 2 and "layers" in name
        if sparse:
            mask = (torch.rand(shape, generator=g) < 0.5).to(torch.uint8)
            w *= mask
            tensors[name[: -len("weight")] + "mask"] = mask
        tensors[name] = w
    save_file(tensors, str(run / "model.safetensors"),
              metadata={"step": "7", "vocab_size": "250", "padded_vocab_size": "256"})
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_peak_memory_is_a_shard_not_the_model(family, tmp_path):
    import torch
    from safetensors import safe_open

    tensors = _synthetic_run(tmp_path / "run", family)
    total = (tmp_path / "run" / "model.safetensors").stat().st_size
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    assert total >= 200e6 and largest <= 20e6
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"), str(out), str(SHARD)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["base"]
    print(f"{family}: checkpoint {total / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, shard {SHARD / 1e6:.1f} MB: "
          f"peak RSS growth {growth / 1e6:.0f} MB (reset {rss['reset']})")
    assert growth <= 0.5 * total, (growth, total)
    # a shard + a tensor and its copies / doped fold blocks (measured: wide 56 MB, doped 82 MB)
    assert growth <= SHARD + 4 * largest, (growth, SHARD, largest)

    # transformers' sharded layout, every tensor in exactly one shard, each shard within the limit
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    n_params = 0
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            assert (f.metadata() or {}).get("format") == "pt"
            keys = list(f.keys())
            assert keys and all(index["weight_map"][k] == name for k in keys)
            sizes = [math.prod(f.get_slice(k).get_shape()) * 4 for k in keys]
            assert sum(sizes) <= SHARD or len(keys) == 1
            n_params += sum(sizes) // 4
    assert n_params == index["metadata"]["total_parameters"] == index["metadata"]["total_size"] // 4
    # a spot check of the mapping: wte keeps the unpadded rows, an MLP weight is W^T (doped: (W_s + V U)^T)
    with safe_open(str(out / index["weight_map"]["transformer.wte.weight"]), framework="pt") as f:
        assert f.get_tensor("transformer.wte.weight").equal(tensors["embedding.word_embeddings.weight"][:250])
    with safe_open(str(out / index["weight_map"]["transformer.h.3.mlp.c_fc.weight"]), framework="pt") as f:
        got = f.get_tensor("transformer.h.3.mlp.c_fc.weight")
    p = "decoder.layers.3.mlp.linear_fc1"
    if family == "doped":
        want = tensors[f"{p}.sparse.weight"].double() + tensors[f"{p}.v.weight"].double() @ tensors[
            f"{p}.u.weight"].double()
        torch.testing.assert_close(got, want.float().t(), rtol=0, atol=1e-5)
    else:
        assert got.equal(tensors[f"{p}.weight"].t())

    # sparsity stats from the masks, read lazily as well
    stats = json.loads((out / "sparsity_stats.json").read_text())
    masks = {k: t for k, t in tensors.items() if k.endswith(".mask")}
    assert stats["step"] == 7 and stats["total"]["sparse_tensors"] == len(masks) == 16
    assert stats["total"]["nnz"] == sum(int(m.sum()) for m in masks.values())
    for row in stats["tensors"]:
        m = masks[row["name"][: -len("weight")] + "mask"]
        w = tensors[row["name"]]
        assert row["nnz"] == int(m.sum()) == row["nonzero_weights"] == int((w != 0).sum())
        assert row["nonzero_outside_mask"] == 0 and row["shape"] == list(m.shape)


@pytest.mark.parametrize("bad", ["0", 0, -5, "lots", "2XB", ""])
def test_bad_max_shard_size_is_one_line(bad, tmp_path):
    from sift_megatron.convert.hf import export_hf, parse_size
    from sift_megatron.errors import SiftError

    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(4096) == 4096
    with pytest.raises(SiftError, match="max shard size .* is not a positive size") as e:
        export_hf(tmp_path / "missing", tmp_path / "out", max_shard_size=bad)  # checked before the checkpoint
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_checkpoint_damaged_after_validation_is_one_line(tmp_path):
    """Tensors are read after the header check, when used: a file that changed since is still a one-line
    error naming it, never a traceback or garbage."""
    from sift_megatron.convert.hf import export_hf
    from sift_megatron.convert.source import load_source
    from sift_megatron.errors import SiftError

    tensors = _synthetic_run(tmp_path / "run", "wide", hidden=64)
    file = tmp_path / "run" / "model.safetensors"
    src = load_source(tmp_path / "run")
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    assert src.tensors[name].equal(tensors[name]) and src.tensors.read(name, rows=3).equal(tensors[name][:3])
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SiftError, match="corrupt or truncated") as e:
        src.tensors[name]
    assert str(file) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SiftError, match="corrupt or truncated"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_checkpoint_damaged_during_export_leaves_no_output(tmp_path, monkeypatch):
    """The file is cut while the export is reading it (after the header check and some shards): a one-line
    error, and neither the export nor its temp directory is left behind."""
    from sift_megatron.convert import source
    from sift_megatron.convert.hf import export_hf
    from sift_megatron.errors import SiftError

    _synthetic_run(tmp_path / "run", "wide", hidden=64)
    file = tmp_path / "run" / "model.safetensors"
    data, reads, read = file.read_bytes(), [], source.LazyTensors.read

    def read_then_cut(self, name, rows=None):
        reads.append(name)
        if len(reads) == 20:
            file.write_bytes(data[: len(data) // 2])
        return read(self, name, rows)

    monkeypatch.setattr(source.LazyTensors, "read", read_then_cut)
    (tmp_path / "out").mkdir()
    with pytest.raises(SiftError, match="corrupt or truncated"):
        export_hf(tmp_path / "run", tmp_path / "out" / "hf", max_shard_size="16KB")
    assert len(reads) == 20 and list((tmp_path / "out").iterdir()) == []
