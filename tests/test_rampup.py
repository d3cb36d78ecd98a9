"""Batch-size ramp-up (train.rampup_batch_size, Megatron-LM's --rampup-batch-size): the schedule is
megatron-core's, budgets and the LR schedule follow the samples consumed, a ramped run computes what fixed-batch
runs chained by resume compute, and a ramped run resumes exactly."""

from __future__ import annotations

import json
import re

import pytest

from sift_megatron.config import BatchSchedule, load_config, rampup_for_layout, resolve_rampup, save_resolved
from sift_megatron.errors import SiftError
from tests.conftest import REPO, run_sift, run_torchrun

TINY = REPO / "configs" / "tiny" / "dense.yaml"  # micro batch 4, seq 64
GPT3 = sorted((REPO / "configs" / "gpt3").glob("*/*.yaml"))


@pytest.mark.parametrize("gbs, ramp", [(12, [4, 4, 8]), (256, [16, 16, 5000]), (1536, [32, 32, 1_953_125]),
                                       (64, [8, 8, 1]), (40, [8, 16, 1000])])
def test_schedule_is_megatron_cores(gbs, ramp):
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    cfg = load_config(TINY, [f"train.global_batch_size={gbs}", f"train.rampup_batch_size={ramp}"])
    ours = BatchSchedule(cfg)
    ref = RampupBatchsizeNumMicroBatchesCalculator(gbs, 4, 1, False, 0, *ramp)
    done = 0
    for step in range(len(ours.before) + 3):
        ref.update(done, consistency_check=True)
        assert ours.batch(step) == ref.get_current_global_batch_size(), (step, done)
        assert ours.samples_before(step) == done
        assert ours.steps_for(done) == step and ours.steps_for(done + 1) == step + 1
        done += ours.batch(step)


def test_budgets_and_lr_follow_the_ramp():
    from sift_megatron.training.engine import lr_lambda

    cfg = load_config(TINY, ["train.global_batch_size=12", "train.rampup_batch_size=[4, 4, 8]", "train.samples=40",
                             "lr_schedule.warmup_samples=24", "lr_schedule.style=linear"])
    sched = BatchSchedule(cfg)
    assert [sched.batch(i) for i in range(5)] == [4, 8, 12, 12, 12]
    assert cfg.train.steps == 5 and cfg.lr_schedule.warmup_steps == 3  # 4 + 8 + 12 = 24 samples
    f = lr_lambda(cfg)
    assert [f(i) for i in range(3)] == [4 / 24, 12 / 24, 1.0]  # warm-up by samples consumed, end of each step
    assert load_config(TINY, ["train.global_batch_size=12", "train.rampup_batch_size=[4, 4, 8]",
                              "train.tokens=1536"]).train.steps == 3  # 24 samples x 64 tokens


@pytest.mark.parametrize("overrides, needle", [
    (["train.rampup_batch_size=[4, 4]"], "must be [start, increment, ramp samples] (integers), got [4, 4]"),
    (["train.rampup_batch_size=[8, 4, 100]"], "need 0 < start < global_batch_size 8"),
    (["train.rampup_batch_size=[4, 4, 0]"], "increment > 0 and ramp samples > 0"),
    (["train.global_batch_size=16", "train.rampup_batch_size=[4, 8, 100]"], "16 - start 4 is not a multiple of "
                                                                             "the increment 8"),
    (["train.global_batch_size=16", "train.rampup_batch_size=[2, 2, 100]"], "multiples of train.micro_batch_size 4"),
    (["train.rampup_batch_size=[4, 4, 8]", "parallel.pipeline=2", "parallel.virtual_pipeline=2"],
     "needs parallel.virtual_pipeline null, got 2"),
])
def test_bad_ramps_are_one_line_errors(overrides, needle):
    with pytest.raises(SiftError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides)


def test_ramp_must_split_over_data_parallel_ranks():
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.rampup_batch_size=[4, 4, 100]"])
    resolve_rampup(cfg, 1)
    with pytest.raises(SiftError, match="multiples of micro_batch_size x DP = 4 x 2"):
        resolve_rampup(cfg, 2)


@pytest.mark.parametrize("mbs, dp, want", [
    (4, 1, [16, 4, 1000]),    # 1,024 tokens = 16 sequences of 64: whole micro-batches already
    (4, 8, [32, 32, 1000]),   # 16 sequences round up to one micro-batch on each of 8 ranks
    (2, 3, [18, 6, 1000]),    # the smallest multiple of 6 holding 16 sequences
    (1, 1, [16, 1, 1000]),
])
def test_rampup_tokens_become_the_finest_ramp_of_the_layout(mbs, dp, want):
    cfg = load_config(TINY, [f"train.micro_batch_size={mbs}", "train.global_batch_size=96",
                             "train.rampup_tokens=[1024, 64000]", "train.tokens=640000"])
    assert cfg.train.rampup_batch_size is None and cfg.train.steps == 105  # no layout yet: a fixed batch
    resolve_rampup(cfg, dp)
    assert cfg.train.rampup_batch_size == want
    sched = BatchSchedule(cfg)
    assert cfg.train.steps == sched.steps_for(10_000) > 105  # the ramp's smaller batches take more steps
    assert {sched.batch(i) % (mbs * dp) for i in range(cfg.train.steps)} == {0}  # whole micro-batches per rank


def test_rampup_tokens_errors_and_units():
    with pytest.raises(SiftError, match=r"^train.rampup_tokens must be \[start tokens, ramp tokens\] \(positive "
                                        r"integers\), got \[1024\]$"):
        load_config(TINY, ["train.rampup_tokens=[1024]"])
    with pytest.raises(SiftError, match=r"start 512 tokens must be below a global batch \(8 x 64 tokens\)"):
        load_config(TINY, ["train.rampup_tokens=[512, 6400]"])
    cfg = load_config(TINY, ["train.global_batch_size=32", "train.rampup_tokens=[256, 6400]"])
    with pytest.raises(SiftError, match=r"micro_batch_size x DP = 4 x 8 = 32 sequences, is not below "
                                        r"global_batch_size 32; allowed: fewer data-parallel ranks"):
        resolve_rampup(cfg, 8)
    with pytest.raises(SiftError, match=r"train.rampup_batch_size \[4, 4, 8\] and train.rampup_tokens \[256, 512\] "
                                        r"are both set in the overrides: give at most one of"):
        load_config(TINY, ["train.rampup_batch_size=[4, 4, 8]", "train.rampup_tokens=[256, 512]"])
    # an override in one unit replaces the config's other unit, as for budgets
    cfg = load_config(GPT3[0], ["train.rampup_batch_size=[16, 16, 100]"])
    assert cfg.train.rampup_tokens is None and cfg.train.rampup_batch_size == [16, 16, 100]


def test_resolved_config_reloads_the_tokens_ramp(tmp_path):
    cfg = load_config(TINY, ["train.global_batch_size=32", "train.rampup_tokens=[1024, 64000]"])
    resolve_rampup(cfg, 2)
    save_resolved(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    resolve_rampup(again, 2)
    assert again.train.rampup_batch_size == cfg.train.rampup_batch_size == [16, 8, 1000]


def test_resume_with_another_ramp_is_a_one_line_error(tmp_path):
    from sift_megatron.preflight import check_checkpoint

    ck = tmp_path / "step_2"
    ck.mkdir()
    for name in ("dcp.json", "config.yaml"):
        (ck / name).write_bytes(b"")
    cfg = load_config(TINY, ["train.micro_batch_size=1", "train.global_batch_size=32", "train.rampup_tokens=[256, 2560]"])
    resolve_rampup(cfg, 1)  # [4, 1, 40]: batches 4, 6, ...
    (ck / "meta.json").write_text(json.dumps({"step": 2, "consumed_samples": 10, "layout": {"tp": 1, "dp": 1}}))
    with pytest.raises(SiftError, match="corrupt or truncated"):  # the ramp agrees: on to the next check
        check_checkpoint(cfg, ck, 1)
    resolve_rampup(cfg, 4)  # [4, 4, 40]: batches 4, 4, ...
    with pytest.raises(SiftError, match=r"is at step 2 after 10 samples, but this run's batch ramp \(train.rampup_"
                                        r"batch_size \[4, 4, 40\] at micro_batch_size x DP = 1 x 4\) reaches "
                                        r"step 2 after 8: resume with the ramp, global batch and data-parallel size "
                                        r"it was saved with \(DP 1\)"):
        check_checkpoint(cfg, ck, 4)


def _documented_gpus(path) -> int:
    """The GPU count a GPT-3 config's layout was sized for: `(--gpus N)` in it or in the dense.yaml it includes."""
    for p in (path, path.parent / "dense.yaml"):
        m = re.search(r"\(--gpus (\d+)\)", p.read_text())
        if m:
            return int(m.group(1))
    raise AssertionError(f"{path} documents no GPU count")


@pytest.mark.parametrize("path", [p for p in GPT3], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_gpt3_configs_carry_the_papers_ramp_and_run_at_their_gpus(path):
    """What `sift check --world-size N` / `sift train` (preflight) and `sift plan --gpus N` decide at the GPU
    count each config documents: accepted, with GPT-3's ramp from 32K tokens over 4-12B tokens."""
    from sift_megatron.ift.plan import plan_report
    from sift_megatron.training.engine import check_layout

    gpus = _documented_gpus(path)
    cfg = load_config(path)
    size = path.parent.name
    ramp_b = {"2.7b": 8, "6.7b": 8, "13b": 12, "175b": 12}.get(size, 4)
    assert cfg.train.rampup_tokens == [32_768, ramp_b * 10**9] and cfg.train.tokens == 300e9
    assert plan_report(cfg, gpus)["config_layout"]["problems"] == []
    dp, _ = check_layout(cfg, gpus)
    resolve_rampup(cfg, dp)
    start, inc, samples = cfg.train.rampup_batch_size
    unit = cfg.train.micro_batch_size * dp
    assert inc == unit and start % unit == 0 and start * 2048 >= 32_768 > (start - unit) * 2048
    assert samples * 2048 == ramp_b * 10**9
    sched = BatchSchedule(cfg)
    ramp_steps = len(sched.before) - 1
    assert sched.samples_before(ramp_steps) * 2048 == pytest.approx(ramp_b * 1e9, rel=0.02)
    assert cfg.train.steps == sched.steps_for(-(-300_000_000_000 // 2048))
    assert rampup_for_layout(cfg, dp) == [start, inc, samples]


def _losses(run) -> list[tuple]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["consumed_samples"], r["lr"]) for r in recs if "loss" in r]


@pytest.mark.slow
def test_ramped_run_equals_fixed_batches_chained_and_resumes_exactly(tmp_path):
    """Ramp 4 -> 8 -> 12 samples (micro-batches 1, 2, 3: DeepSpeed's own boundary counter would misplace the
    step at the change to 2). Reference: fixed batches 4, 8, 12 chained by resume. ZeRO-1 (no stage-0 shortcut).
    The same ramp at PP=2 reproduces the losses (as tests/test_parallel_equivalence.py's layouts do)."""
    common = [str(TINY), "data.mock=true", "lr_schedule.style=constant", "lr_schedule.warmup_steps=0",
              "logging.progress=false", "logging.tensorboard=false", "zero.stage0_when_single_replica=false"]
    env = {"OMP_NUM_THREADS": "1"}
    ramp = ["train.global_batch_size=12", "train.rampup_batch_size=[4, 4, 8]"]
    run_sift(["train", *common, *ramp, "train.steps=4", f"train.out_dir={tmp_path / 'ramp'}"], env=env)
    ref = tmp_path / "fixed"
    for gbs, steps in ((4, 1), (8, 2), (12, 4)):
        run_sift(["train", *common, f"train.global_batch_size={gbs}", f"train.steps={steps}", "train.resume=auto",
                  f"train.out_dir={ref}"], env=env)
    got = _losses(tmp_path / "ramp")
    assert [(s, c) for s, _, c, _ in got] == [(1, 4), (2, 12), (3, 24), (4, 36)]
    assert got == _losses(ref)  # bitwise: same samples, same accumulation, same updates
    cut = tmp_path / "cut"
    for steps in (2, 4):
        run_sift(["train", *common, *ramp, f"train.steps={steps}", "train.resume=auto", f"train.out_dir={cut}"],
                 env=env)
    assert _losses(cut) == got
    pp = tmp_path / "pp2"  # PP=2: megatron's schedule runs 1, 2, 3 micro-batches and scales the loss by their count
    run_torchrun(2, ["-m", "sift_megatron.cli", "train", *common, *ramp, "train.steps=4", "parallel.pipeline=2",
                     f"train.out_dir={pp}"])
    got_pp = _losses(pp)
    assert [(s, c, lr) for s, _, c, lr in got_pp] == [(s, c, lr) for s, _, c, lr in got]
    assert [x for _, x, _, _ in got_pp] == pytest.approx([x for _, x, _, _ in got], abs=1e-5, rel=0)
