"""The streaming safetensors writer behind the end-of-run mask export (sparse/export.py write_streamed): the
file it writes one tensor at a time is the file save_file writes from all of them at once (byte for byte, so
load_file, `sift spectral` and every reader see the same tensors and metadata), and it is never half-written.
The multi-rank export through it is compared across TP/PP layouts in tests/test_sparse_families.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sift_megatron.sparse.export import save_order, write_streamed
from tests.conftest import REPO, fault_env


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in (("decoder.layers.1.mlp.linear_fc1", (12, 5)), ("decoder.layers.0.self_attention.linear_qkv",
                        (9, 4)), ("decoder.layers.0.mlp.linear_fc2", (3, 7)), ("output_layer", (1, 1))):
        out[f"{name}.weight"] = torch.randn(shape, generator=g)
        out[f"{name}.mask"] = (torch.rand(shape, generator=g) < 0.5).to(torch.uint8)
    return out


def _specs(tensors):
    return save_order([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])


@pytest.mark.parametrize("meta", [{"step": "7"}, None])
def test_streamed_file_is_save_files_file(tmp_path, meta):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
    specs = _specs(tensors)
    handed, last = [], None

    def one_at_a_time():  # the writer has dropped each tensor before it asks for the next one
        nonlocal last
        for key, _, _ in specs:
            assert last is None or last() is None, handed[-1]
            handed.append(key)
            t = tensors[key].clone()
            last = weakref.ref(t)
            yield t
            del t

    out = write_streamed(tmp_path / "masks.safetensors", specs, one_at_a_time(), meta)
    assert handed == [k for k, _, _ in specs] and len(handed) == 8
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    got = load_file(out)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors", "ref.safetensors"]


def test_failure_mid_write_leaves_no_file(tmp_path):
    tensors = _tensors()
    specs = _specs(tensors)
    target = tmp_path / "masks.safetensors"

    def broken():
        yield tensors[specs[0][0]]
        raise RuntimeError("sender died")

    with pytest.raises(RuntimeError, match="sender died"):
        write_streamed(target, specs, broken(), {"step": "1"})
    wrong = [tensors[k] for k, _, _ in specs]
    wrong[2] = wrong[2][:1]  # a tensor whose shape is not the header's is refused, not written
    with pytest.raises(ValueError, match="the header says"):
        write_streamed(target, specs, iter(wrong), {"step": "1"})
    with pytest.raises(ValueError, match="no tensor for"):
        write_streamed(target, specs, iter(wrong[:2]), {"step": "1"})
    assert list(tmp_path.iterdir()) == []


def test_kill_mid_write_keeps_the_previous_file(tmp_path):
    """SIGKILL after the data, before the rename (the `write_masks` fault point): the old file stays whole."""
    target = tmp_path / "masks.safetensors"
    old = {"a.mask": torch.ones(2, 2, dtype=torch.uint8)}
    save_file(old, str(target), metadata={"step": "1"})
    code = ("import sys, torch; from sift_megatron.sparse.export import write_streamed; "
            "t = torch.zeros(3, 3); write_streamed(sys.argv[1], [('a.weight', t.dtype, (3, 3))], [t], {'step': '2'})")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, **fault_env(SIFT_FAULT_KILL_AT="write_masks")})
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (proc.returncode, proc.stderr[-2000:])
    assert torch.equal(load_file(target)["a.mask"], old["a.mask"])
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["masks.safetensors"]
