"""Batch-size ramp-up (train.rampup_batch_size, Megatron-LM's --rampup-batch-size): the schedule is
megatron-core's, budgets and the LR schedule follow the samples consumed, a ramped run computes what fixed-batch
runs chained by resume compute, and a ramped run resumes exactly."""

from __future__ import annotations

import json

import pytest

from sift_megatron.config import BatchSchedule, check_rampup_layout, load_config
from sift_megatron.errors import SiftError
from tests.conftest import REPO, run_sift

TINY = REPO / "configs" / "tiny" / "dense.yaml"  # micro batch 4, seq 64


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
    (["train.rampup_batch_size=[4, 4, 8]", "parallel.pipeline=2"], "needs parallel.pipeline 1, got 2"),
])
def test_bad_ramps_are_one_line_errors(overrides, needle):
    with pytest.raises(SiftError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides)


def test_ramp_must_split_over_data_parallel_ranks():
    cfg = load_config(TINY, ["train.global_batch_size=16", "train.rampup_batch_size=[4, 4, 100]"])
    check_rampup_layout(cfg, 1)
    with pytest.raises(SiftError, match="multiples of micro_batch_size x DP = 4 x 2"):
        check_rampup_layout(cfg, 2)


def _losses(run) -> list[tuple]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["consumed_samples"], r["lr"]) for r in recs if "loss" in r]


@pytest.mark.slow
def test_ramped_run_equals_fixed_batches_chained_and_resumes_exactly(tmp_path):
    """Ramp 4 -> 8 -> 12 samples (micro-batches 1, 2, 3: DeepSpeed's own boundary counter would misplace the
    step at the change to 2). Reference: fixed batches 4, 8, 12 chained by resume. ZeRO-1 (no stage-0 shortcut)."""
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
