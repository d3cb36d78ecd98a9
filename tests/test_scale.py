"""`sift plan`'s scale model (issue 15, item 6): checkpoint bytes per rank and in total, save time at a
filesystem bandwidth, and the communication of one RigL update and its share of training time. Checked here
for its arithmetic and its JSON; its validation against measured runs is still open (issue 15)."""

from __future__ import annotations

import json

import pytest

from sift_megatron.config import load_config
from sift_megatron.ift.plan import plan_report
from sift_megatron.ift.scale import GB
from tests.conftest import REPO, run_sift

GPT3 = REPO / "configs" / "gpt3"


def test_plan_json_has_checkpoint_size_save_time_and_rigl_cost():
    proc = run_sift(["plan", str(GPT3 / "175b" / "sparse_wide_s75_rigl.yaml"), "--gpus", "1024", "--json",
                     "--fs-gbps", "10"])
    rep = json.loads(proc.stdout)
    sc, sug = rep["scale"], rep["suggested"]
    ck, rigl = sc["checkpoint"], sc["rigl_update"]
    stored = rep["params"]["transformed"]["stored"]
    # the layout-independent copy is the whole model in fp32 and both Adam moments (+ the fp32 master: the
    # GPT-3 configs train in bf16), gathered into rank 0
    assert ck["gathered_files"]["optimizer.safetensors"] == 12 * stored
    assert ck["bytes_gathered_rank0"] > 8 * stored * 1.5 > 5e12  # > 5.6 TB of moments: issue 15's numbers
    assert ck["bytes_per_rank_max"] > ck["bytes_gathered_rank0"] > 100 * ck["bytes_per_rank_other"]
    assert ck["save_s"] == pytest.approx(ck["save_s_sharded_part"] + ck["save_s_gathered_part"])
    # resharded: every DP replica reads the model (+ masks) and the moments
    read = ck["gathered_files"]["model.safetensors"] + ck["gathered_files"]["optimizer.safetensors"]
    assert ck["load_s_resharded"] == pytest.approx(sug["dp"] * read / (10 * GB))
    assert sc["assumptions"]["fs_gbps"] == 10
    assert rigl["interval"] == 100 and 0 < rigl["share_of_training"] < 1
    # the DP all-reduce carries the fp32 dense gradient of the GPU's sparse elements (+ the fp32 master: bf16)
    assert rigl["dp_allreduce_bytes"] == pytest.approx(2 * 4 * sug["memory_gb"]["masks"] * GB)
    assert "RigL update every 100 steps" in run_sift(
        ["plan", str(GPT3 / "175b" / "sparse_wide_s75_rigl.yaml"), "--gpus", "1024"]).stdout


def test_scale_model_responds_to_its_inputs():
    cfg = load_config(GPT3 / "13b" / "sparse_wide_s75_rigl.yaml")
    slow = plan_report(cfg, 64, scale={"fs_gbps": 1.0, "client_gbps": 1.0})["scale"]
    fast = plan_report(cfg, 64, scale={"fs_gbps": 4.0, "client_gbps": 4.0})["scale"]
    assert slow["checkpoint"]["save_s"] == pytest.approx(4 * fast["checkpoint"]["save_s"])
    assert slow["checkpoint"]["bytes_total"] == fast["checkpoint"]["bytes_total"]
    base = plan_report(cfg, 64)["scale"]["rigl_update"]
    rare = plan_report(load_config(GPT3 / "13b" / "sparse_wide_s75_rigl.yaml", ["dst.interval=1000"]), 64)
    assert rare["scale"]["rigl_update"]["share_of_training"] < base["share_of_training"]
    # no DST, no update cost; static masks keep the checkpoint terms
    static = plan_report(load_config(GPT3 / "13b" / "sparse_wide_s50_static.yaml"), 64)["scale"]
    assert static["rigl_update"] is None and static["checkpoint"]["bytes_total"] > 0


def test_scale_options_are_checked():
    proc = run_sift(["plan", str(GPT3 / "125m" / "dense.yaml"), "--gpus", "8", "--fs-gbps", "0"], check=False)
    assert proc.returncode != 0 and "--fs-gbps must be > 0, got 0.0" in proc.stderr


@pytest.mark.slow
def test_checkpoint_bytes_match_a_written_checkpoint(tmp_path):
    """A DP=2 ZeRO-1 RigL run on the tiny model: the predicted bytes in total, of global rank 0 and of the other
    rank are within 10 % of the files written (measured: ~3 % under, DeepSpeed's own bookkeeping)."""
    from tests.conftest import run_torchrun

    tiny = REPO / "configs" / "tiny" / "dense.yaml"
    over = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl", "dst.interval=1", "train.steps=2",
            "train.save_interval=2", "logging.progress=false", "logging.tensorboard=false"]
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", str(tiny), f"train.out_dir={tmp_path}", *over])
    files = {f.name: f.stat().st_size for f in (tmp_path / "checkpoints" / "step_000002").iterdir()}
    other = files.pop("zero_pp_rank_1_mp_rank_00_optim_states.pt") + files.pop("rng_rank00001.pt")
    cfg = load_config(tiny, over)
    plan = plan_report(cfg, 2)
    from sift_megatron.ift.scale import scale_report

    lay = plan["config_layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["zero_stage"]) == (1, 1, 2, 1)
    ck = scale_report(cfg, plan, lay)["checkpoint"]
    for name, pred, got in (("total", ck["bytes_total"], sum(files.values()) + other),
                            ("rank 0", ck["bytes_per_rank_max"], sum(files.values())),
                            ("rank 1", ck["bytes_per_rank_other"], other)):
        print(f"{name}: predicted {pred:.0f} B, written {got} B ({pred / got - 1:+.1%})")
        assert abs(pred / got - 1) <= 0.10, name
