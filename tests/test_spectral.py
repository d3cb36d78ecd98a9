"""Spectral analysis of masks (sift_megatron/spectral, spec section 4): known spectra, agreement with an
independent full-adjacency eigensolver (dense numpy and scipy eigsh), the masks file reader, and the
`sift spectral` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from sift_megatron.errors import SiftError
from sift_megatron.spectral.io import read_masks, resolve_masks_file
from sift_megatron.spectral.metrics import analyze_layer, analyze_masks, summary_scalars, top2_singular
from sift_megatron.spectral.reference import reference_layer
from tests.conftest import run_sift

COMPARED = ("mu0", "mu_hat", "bound_r", "delta_r", "delta_r_norm", "bound_s", "delta_s", "delta_s_norm", "narc",
            "mu0_w", "mu_hat_w", "lambda", "delta_r_imdb", "delta_r_imdb_norm", "delta_s_imdb",
            "delta_s_imdb_norm", "lambda_imsg", "full_spectrum")


def assert_same(fast: dict, ref: dict, rtol: float = 1e-6) -> None:
    """Every metric the reference defines, to rtol (absolute floor scaled by mu0 for values near 0)."""
    assert fast["status"] == ref["status"]
    scale = max(1.0, abs(ref["mu0"] or 0.0))
    for k in COMPARED:
        a, b = fast[k], ref[k]
        assert (a is None) == (b is None), (k, a, b)
        if b is not None:
            assert abs(a - b) <= rtol * abs(b) + 1e-9 * scale, (k, a, b)


def random_layer(rng: np.random.Generator, shape: tuple[int, int], density: float) -> tuple[np.ndarray, np.ndarray]:
    mask = rng.random(shape) < density
    weight = (rng.standard_normal(shape) * 0.02 * mask).astype(np.float32)
    return mask, weight


def random_regular(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """A simple d-regular bipartite graph on n + n nodes: d random permutation matrices, collisions removed
    by random transpositions."""
    b = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)
    for _ in range(d):
        p = rng.permutation(n)
        while (bad := np.flatnonzero(b[rows, p])).size:
            i, j = bad[0], rng.integers(n)
            if not b[i, p[j]] and not b[j, p[i]]:
                p[i], p[j] = p[j], p[i]
        b[rows, p] = True
    return b


# ---------------------------------------------------------------------------------------------------------
# Known spectra


@pytest.mark.parametrize(("shape", "dense_max"), [((20, 30), 256), ((120, 300), 0)])
def test_complete_bipartite_has_mu_hat_zero(shape, dense_max):
    r = analyze_layer(np.ones(shape, dtype=bool), dense_max=dense_max)
    out, inp = shape
    assert r["mu0"] == pytest.approx(math.sqrt(out * inp), rel=1e-12)
    assert abs(r["mu_hat"]) < 1e-9 * r["mu0"]  # rank 1
    assert r["delta_r"] == pytest.approx(r["bound_r"], rel=1e-9)
    assert r["bound_r"] == pytest.approx(math.sqrt(out - 1) + math.sqrt(inp - 1))
    assert r["imdb_subgraphs"] == 1 and r["delta_r_imdb"] is not None


@pytest.mark.parametrize(("n", "d"), [(200, 3), (300, 5), (400, 8)])
def test_random_biregular_graphs_are_near_ramanujan(n, d):
    rng = np.random.default_rng(n + d)
    square = analyze_layer(random_regular(n, d, rng), iterative=False)
    bound = 2 * math.sqrt(d - 1)
    assert square["mu0"] == pytest.approx(d, rel=1e-9)
    assert square["bound_r"] == pytest.approx(bound)
    assert abs(square["mu_hat"] / bound - 1) < 0.08, square["mu_hat"]
    assert square["delta_s"] == pytest.approx(square["delta_r"], abs=1e-9)  # mu0 = d: both forms agree
    # (d, 2d)-biregular: in units have degree d, out units 2d
    rect = analyze_layer(np.hstack([random_regular(n, d, rng), random_regular(n, d, rng)]), iterative=False)
    bound = math.sqrt(d - 1) + math.sqrt(2 * d - 1)
    assert (rect["d_left"], rect["d_right"]) == (d, 2 * d)
    assert rect["mu0"] == pytest.approx(math.sqrt(2) * d, rel=1e-9)
    assert abs(rect["mu_hat"] / bound - 1) < 0.08, rect["mu_hat"]


def test_banded_mask_is_far_from_ramanujan():
    """A structured (circulant) d-regular mask expands badly: mu_hat near d, delta_r strongly negative."""
    n, d = 300, 6
    b = np.zeros((n, n), dtype=bool)
    for k in range(d):
        b[np.arange(n), (np.arange(n) + k) % n] = True
    r = analyze_layer(b, iterative=False)
    assert r["mu_hat"] > 0.95 * d and r["delta_r"] < -0.9


def test_top2_singular_paths_agree():
    rng = np.random.default_rng(0)
    m = (rng.random((70, 400)) < 0.2) * rng.random((70, 400))
    exact = np.linalg.svd(m, compute_uv=False)[:2]
    for dense_max in (0, 1000):
        assert np.allclose(top2_singular(m, dense_max=dense_max), exact, rtol=1e-10, atol=0)
    assert top2_singular(np.ones((1, 5))) == pytest.approx((math.sqrt(5), 0.0))
    assert top2_singular(np.zeros((0, 3))) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Agreement with the full-adjacency reference


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out=st.integers(4, 40), inp=st.integers(4, 40), density=st.floats(0.05, 1.0), seed=st.integers(0, 2**31),
       convention=st.sampled_from(["neurips23", "iclr23"]), svds_path=st.booleans(), weights=st.booleans())
def test_small_masks_match_dense_eigendecomposition(out, inp, density, seed, convention, svds_path, weights):
    mask, weight = random_layer(np.random.default_rng(seed), (out, inp), density)
    weight = weight if weights else None
    fast = analyze_layer(mask, weight, convention=convention, dense_max=0 if svds_path else 256)
    assert_same(fast, reference_layer(mask, weight, convention=convention, method="dense"))


def test_larger_mask_matches_eigsh_on_full_adjacency():
    mask, weight = random_layer(np.random.default_rng(7), (300, 600), 0.1)
    ref = reference_layer(mask, weight, method="eigsh")
    assert ref["status"] == "ok" and ref["delta_r_imdb"] is not None and ref["lambda_imsg"] is not None
    for dense_max in (256, 0):  # dense Gram for the subgraphs / Lanczos everywhere
        assert_same(analyze_layer(mask, weight, dense_max=dense_max), ref)


def test_conv_weight_uses_kernel_taps_as_left_nodes():
    rng = np.random.default_rng(3)
    mask = rng.random((16, 4, 3, 3)) < 0.4
    r = analyze_layer(mask)
    assert r["in"] == 36 and r["out"] == 16
    assert_same(r, reference_layer(mask, method="dense"))


# ---------------------------------------------------------------------------------------------------------
# Skips, model averages, summaries


def test_sparse_layers_are_skipped_not_fatal():
    rng = np.random.default_rng(1)
    good = random_layer(rng, (48, 64), 0.3)
    masks = {"layers.10.fc": good, "layers.2.fc": good, "layers.3.empty": (np.zeros((8, 8), bool), None),
             "layers.4.diag": (np.eye(32, dtype=np.uint8), None)}
    res = analyze_masks(masks)
    by = {r["name"]: r for r in res["layers"]}
    assert [r["name"] for r in res["layers"]] == ["layers.2.fc", "layers.3.empty", "layers.4.diag", "layers.10.fc"]
    assert by["layers.3.empty"]["status"] == "skipped" and by["layers.3.empty"]["reason"] == "no edges"
    assert by["layers.4.diag"]["status"] == "skipped" and "too few edges" in by["layers.4.diag"]["reason"]
    assert by["layers.4.diag"]["delta_r"] is None
    m = res["model"]
    assert (m["layers"], m["scored"], m["n_delta_r"]) == (4, 2, 2)
    assert m["delta_r"] == pytest.approx(by["layers.2.fc"]["delta_r"])  # mean over the scored layers only
    assert m["n_lambda"] == 2 and m["lambda"] is not None


def test_non_finite_weights_keep_the_topology():
    mask, weight = random_layer(np.random.default_rng(2), (32, 32), 0.5)
    weight[mask.nonzero()[0][0], mask.nonzero()[1][0]] = np.nan
    r = analyze_layer(mask, weight)
    assert r["status"] == "ok" and r["delta_r"] is not None and r["lambda"] is None and r["weight_note"]


def test_summary_scalars_are_flat_finite_floats():
    rng = np.random.default_rng(4)
    res = analyze_masks({"a.fc1": random_layer(rng, (64, 32), 0.3), "a.tiny": (np.eye(4, dtype=bool), None)})
    s = summary_scalars(res)
    assert s["spectral/delta_r"] == pytest.approx(res["model"]["delta_r"])
    assert s["spectral/layers_scored"] == 1.0
    assert "spectral_layers/a.fc1/lambda_imsg" in s and not any(k.startswith("spectral_layers/a.tiny") for k in s)
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())
    assert not any("layers/" in k for k in summary_scalars(res, per_layer=False))


def test_results_are_deterministic_and_independent_of_threads():
    rng = np.random.default_rng(5)
    masks = {"x": random_layer(rng, (300, 500), 0.2), "y": random_layer(rng, (120, 90), 0.3)}
    a = analyze_masks(masks, dense_max=0)
    assert json.dumps(a) == json.dumps(analyze_masks(masks, dense_max=0))
    assert json.dumps(a) == json.dumps(analyze_masks(masks, dense_max=0, jobs=2))


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints


def write_checkpoint(root, step: int, layers: dict, *, uint8: bool = True) -> None:
    """A checkpoints root as training writes it: <root>/step_N/sparse_masks.safetensors + `latest`."""
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (mask, weight) in layers.items():
        tensors[f"{name}.mask"] = mask.astype(np.uint8) if uint8 else mask
        if weight is not None:
            tensors[f"{name}.weight"] = weight
    save_file(tensors, str(d / "sparse_masks.safetensors"), metadata={"step": str(step)})
    (root / "latest").write_text(f"step_{step:06d}\n")


def test_read_masks_follows_latest_and_reads_the_contract(tmp_path):
    rng = np.random.default_rng(6)
    layers = {"decoder.layers.0.mlp.linear_fc1": random_layer(rng, (40, 10), 0.4),
              "decoder.layers.0.self_attention.linear_proj": (rng.random((10, 10)) < 0.5, None)}
    write_checkpoint(tmp_path / "run" / "checkpoints", 7, layers)
    write_checkpoint(tmp_path / "run" / "checkpoints", 9, layers, uint8=False)
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "step_000009",
                  tmp_path / "run" / "checkpoints" / "step_000009" / "sparse_masks.safetensors"):
        step, masks = read_masks(where)
        assert step == 9 and sorted(masks) == sorted(layers)
    step, masks = read_masks(tmp_path / "run" / "checkpoints" / "step_000007", lazy=True)
    assert step == 7
    mask, weight = masks["decoder.layers.0.mlp.linear_fc1"]
    assert mask.dtype == np.bool_ and np.array_equal(mask, layers["decoder.layers.0.mlp.linear_fc1"][0])
    assert weight.dtype == np.float32 and np.array_equal(weight, layers["decoder.layers.0.mlp.linear_fc1"][1])
    assert masks["decoder.layers.0.self_attention.linear_proj"][1] is None


def test_read_masks_errors_are_sift_errors(tmp_path):
    with pytest.raises(SiftError, match="no such file"):
        read_masks(tmp_path / "missing")
    (tmp_path / "dense").mkdir()
    with pytest.raises(SiftError, match="no sparse_masks.safetensors"):
        read_masks(tmp_path / "dense")
    (tmp_path / "dense" / "latest").write_text("step_000005\n")
    with pytest.raises(SiftError, match="not a checkpoint directory"):
        resolve_masks_file(tmp_path / "dense")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SiftError, match="not a readable safetensors file"):
        read_masks(bad)
    save_file({"x.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SiftError, match="no '<layer>.mask'"):
        read_masks(tmp_path / "w.safetensors")
    save_file({"x.mask": np.ones((2, 2), np.uint8), "x.weight": np.ones((2, 3), np.float32)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(SiftError, match="weight shape"):
        read_masks(tmp_path / "shape.safetensors")


def test_from_flat_takes_the_gathered_training_tensors():
    torch = pytest.importorskip("torch")
    from sift_megatron.spectral.io import from_flat

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(48, 32, generator=g) < 0.3
    weight = (torch.randn(48, 32, generator=g) * mask).to(torch.bfloat16)
    masks = from_flat({"l.mask": mask.to(torch.uint8), "l.weight": weight, "other.bias": torch.zeros(3)})
    assert list(masks) == ["l"] and masks["l"][0].dtype == np.bool_ and masks["l"][1].dtype == np.float32
    assert analyze_masks(masks)["layers"][0]["lambda"] is not None


def test_streamed_layer_records_give_the_gathered_models_scalars():
    """What training logs (stream_spectral_scalars: layers scored one at a time, records merged in any order)
    is exactly summary_scalars(analyze_masks(gathered model), per_layer=False), the pre-streaming numbers."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from sift_megatron.spectral.io import from_flat
    from sift_megatron.spectral.metrics import model_scalars
    from sift_megatron.training.trainer import stream_spectral_scalars

    g = torch.Generator().manual_seed(1)
    shapes = {"decoder.layers.10.mlp.linear_fc1": (96, 48), "decoder.layers.2.mlp.linear_fc2": (48, 96),
              "decoder.layers.2.self_attention.linear_qkv": (144, 48), "decoder.layers.0.mlp.linear_fc1": (6, 48)}
    mods, flat = [], {}
    for i, (name, shape) in enumerate(shapes.items()):  # not in natural order; the last too sparse to score
        mask = torch.rand(shape, generator=g) < (0.25 if i < 3 else 0.01)
        weight = torch.randn(shape, generator=g) * mask
        mods.append((f"{name}.weight", SimpleNamespace(mask=mask, weight=weight, partition_dim=i % 2)))
        flat.update({f"{name}.mask": mask.to(torch.uint8), f"{name}.weight": weight})
    want = summary_scalars(analyze_masks(from_flat(flat)), per_layer=False)
    assert want["spectral/layers_scored"] == 3 and "spectral/lambda_imsg" in want
    assert stream_spectral_scalars(mods, None, active=True) == want
    recs = analyze_masks(from_flat(flat))["layers"]
    assert model_scalars(recs[::-1]) == want  # records from the stages arrive in rank order, not name order
    assert stream_spectral_scalars(mods, None, active=False) == model_scalars([])  # DP > 0: nothing of its own


def test_bf16_weights_are_read_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    save_torch({"l.mask": torch.ones(4, 6, dtype=torch.bool), "l.weight": torch.full((4, 6), 0.5, dtype=torch.bfloat16)},
               str(tmp_path / "m.safetensors"))
    _, masks = read_masks(tmp_path / "m.safetensors")
    assert masks["l"][1].dtype == np.float32 and np.all(masks["l"][1] == 0.5)


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_writes_json_csv_and_plots(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "run" / "checkpoints"
    first = {f"decoder.layers.{i}.mlp.linear_fc{j}": random_layer(rng, (64, 16) if j == 1 else (16, 64), 0.3)
             for i in range(2) for j in (1, 2)}
    first["decoder.layers.0.tiny"] = (np.eye(8, dtype=bool), None)
    write_checkpoint(root, 10, first)
    second = {k: random_layer(rng, v[0].shape, 0.3) for k, v in first.items()}
    write_checkpoint(root, 20, second)
    out = tmp_path / "out"
    proc = run_sift(["spectral", str(root / "step_000010"), str(tmp_path / "run"), "--json", str(out / "r.json"),
                     "--csv", str(out / "r.csv"), "--plot", str(out / "r.png")])
    assert "too few edges" in proc.stdout and "model mean (4/5 scored)" in proc.stdout
    doc = json.loads((out / "r.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20] and doc["convention"] == "neurips23"
    expected = analyze_masks(second)
    got = doc["checkpoints"][1]
    assert got["model"] == pytest.approx(expected["model"])
    assert [r["name"] for r in got["layers"]] == [r["name"] for r in expected["layers"]]
    for a, b in zip(got["layers"], expected["layers"]):
        assert a == pytest.approx(b)
    rows = (out / "r.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (5 + 1) and rows[0].startswith("checkpoint,step,layer,status")
    for png in ("r.png", "r_steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files


def test_cli_no_iterative_single_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 3, {"l.fc": random_layer(np.random.default_rng(9), (40, 40), 0.3)})
    run_sift(["spectral", str(tmp_path), "--no-iterative", "--json", str(tmp_path / "r.json"),
              "--plot", str(tmp_path / "p.png"), "--quiet"])
    rec = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["layers"][0]
    assert rec["delta_r"] is not None and rec["delta_r_imdb"] is None and rec["full_spectrum"] is None
    assert (tmp_path / "p.png").exists() and not (tmp_path / "p_steps.png").exists()


def test_cli_module_imports_no_heavy_packages():
    import subprocess
    import sys

    code = ("import sys, sift_megatron.spectral.cli as c, argparse; c.register(argparse.ArgumentParser()"
            ".add_subparsers()); print(sorted(m for m in ('scipy', 'torch', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("case", ["no_masks", "missing", "corrupt"])
def test_cli_errors_are_one_line(tmp_path, case):
    if case == "no_masks":
        target = tmp_path / "ckpt"
        target.mkdir()
        (target / "model_states.pt").write_bytes(b"")
    elif case == "missing":
        target = tmp_path / "nope"
    else:
        target = tmp_path / "sparse_masks.safetensors"
        target.write_bytes(b"garbage")
    proc = run_sift(["spectral", str(target), "--json", str(tmp_path / "r.json")], check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sift spectral: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_tp2_checkpoint_gives_the_tp1_numbers(tmp_path):
    """Same run (static Sparse Wide masks) at TP=1, TP=2 and PP=2: masks are gathered to their logical shape, so
    every binary metric is identical and the weighted ones agree to training's float noise. The spectral/*
    scalars each run logged at step 2 (streamed: each stage, each TP rank, one layer at a time) are exactly
    the offline `sift spectral` model averages of that run's step-2 checkpoint."""
    from tests.conftest import REPO, run_torchrun

    args = ["train", str(REPO / "configs" / "tiny" / "dense.yaml"), "sparsity.family=wide", "sparsity.s=0.75",
            "train.steps=2", "logging.progress=false", "logging.tensorboard=false", "spectral.interval=2"]
    run_sift([*args, f"train.out_dir={tmp_path / 'tp1'}"])
    run_torchrun(2, ["-m", "sift_megatron.cli", *args, f"train.out_dir={tmp_path / 'tp2'}", "parallel.tensor=2"])
    run_torchrun(2, ["-m", "sift_megatron.cli", *args, f"train.out_dir={tmp_path / 'pp2'}", "parallel.pipeline=2"])
    docs = []
    for run in ("tp1", "tp2", "pp2"):
        run_sift(["spectral", str(tmp_path / run / "checkpoints"), "--json", str(tmp_path / f"{run}.json"),
                  "--quiet"])
        docs.append(json.loads((tmp_path / f"{run}.json").read_text())["checkpoints"][0])
        logged = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        logged = {k: v for r in logged if r.get("step") == 2 for k, v in r.items() if k.startswith("spectral/")}
        assert logged == summary_scalars({"model": docs[-1]["model"]}, per_layer=False), run
        assert logged["spectral/layers_scored"] >= 16 and "spectral/lambda_imsg" in logged, run
    a = docs[0]
    assert a["step"] == 2 and a["model"]["scored"] == a["model"]["layers"] >= 16
    binary = ("edges", "d_left", "d_right", "mu0", "mu_hat", "delta_r", "delta_s", "narc", "delta_r_imdb",
              "delta_s_imdb")
    for b in docs[1:]:
        assert b["step"] == 2
        for ra, rb in zip(a["layers"], b["layers"], strict=True):
            assert ra["name"] == rb["name"]
            assert {k: ra[k] for k in binary} == {k: rb[k] for k in binary}, ra["name"]
            for k in ("lambda", "lambda_imsg", "full_spectrum"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-3), (ra["name"], k)


def _iclr23_random_bound(eig_second: float, total_edges: int, dim_in: int, dim_out: int, avg_left_degree: float,
                         num_left: int, num_right: int) -> float:
    """`random_bound` of the ICLR'23 code (VITA-Group/ramanujan-on-pai lib/graphs/scores.py), transcribed."""
    ls = (eig_second ** 2 / 4 + 1) * math.sqrt(num_left * num_right)
    rs = abs(total_edges - (avg_left_degree / dim_out) * (num_left * num_right))
    return (ls - rs) / (dim_in * dim_out)


@pytest.mark.parametrize("shape", [(512, 128), (128, 512)])
def test_narc_of_a_random_mask_is_not_positive_and_matches_the_reference_code(shape):
    """A uniformly random mask (exact count, s=0.75) is "random" (NaRC <= 0) and NaRC is the ICLR'23 code's
    `random_bound` called as `ramanujan_score` calls it: total_edges = edge_index.size(1), which for an undirected
    PyG graph holds every mask non-zero twice (here: the non-zeros of the symmetric adjacency)."""
    rng = np.random.default_rng(7)
    n = shape[0] * shape[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: n // 4]] = True
    mask = mask.reshape(shape)
    rec = analyze_layer(mask, iterative=False)
    x = mask.T  # [in (left), out (right)], as the reference code lays the graph out
    keep_l, keep_r = x.any(1), x.any(0)
    xk = x[keep_l][:, keep_r].astype(np.float64)
    n_l, n_r = xk.shape
    adj = np.block([[np.zeros((n_l, n_l)), xk], [xk.T, np.zeros((n_r, n_r))]])
    eig = sorted(np.abs(np.linalg.eigvalsh(adj)), reverse=True)
    directed_edges = int(np.count_nonzero(adj))
    assert directed_edges == 2 * int(mask.sum())
    want = _iclr23_random_bound(eig[2], directed_edges, shape[1], shape[0], xk.sum() / n_l, n_l, n_r)
    assert rec["narc"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert rec["narc"] <= 0.0
    assert reference_layer(mask, iterative=False)["narc"] == pytest.approx(want, rel=1e-9, abs=1e-12)
