"""Budgets in steps, tokens or samples (train.*, lr_schedule warm-up / decay): exactly one unit per quantity,
steps derived with ceil and printed, the LR schedule a function of the samples consumed, and resolved configs
that reload to the same run."""

from __future__ import annotations

import json

import pytest
import yaml

from sift_megatron.config import budget_summary, load_config, save_resolved
from sift_megatron.errors import SiftError
from tests.conftest import REPO, run_sift

TINY = REPO / "configs" / "tiny" / "dense.yaml"  # global batch 8, seq 64: 512 tokens per step


def test_steps_derived_from_tokens_and_samples():
    assert load_config(TINY, ["train.tokens=5120"]).train.steps == 10
    assert load_config(TINY, ["train.tokens=5121"]).train.steps == 11  # ceil: at least the budget
    assert load_config(TINY, ["train.samples=80"]).train.steps == 10
    assert load_config(TINY, ["train.samples=80", "train.global_batch_size=16"]).train.steps == 5
    cfg = load_config(TINY, ["train.tokens=51200", "lr_schedule.warmup_tokens=2560", "lr_schedule.decay_samples=600"])
    assert (cfg.train.steps, cfg.lr_schedule.warmup_steps, cfg.lr_schedule.decay_steps) == (100, 5, 70)
    assert budget_summary(cfg) == ("budget: 100 steps x 8 samples x 64 tokens = 800 samples, 51,200 tokens; LR "
                                   "warm-up 2,560 tokens (5.0 steps), cosine decay until 38,400 tokens (75.0 steps)")


@pytest.mark.parametrize("overrides, needle", [
    (["train.steps=3", "train.tokens=5120"], "train.steps 3 and train.tokens 5120 are both set in the overrides"),
    (["train.samples=3", "train.tokens=5120"], "train.tokens 5120 and train.samples 3 are both set"),
    (["lr_schedule.warmup_steps=1", "lr_schedule.warmup_tokens=64"], "give exactly one of lr_schedule.warmup_steps, "
                                                                      "lr_schedule.warmup_tokens"),
    (["lr_schedule.decay_steps=1", "lr_schedule.decay_samples=64"], "lr_schedule.decay_steps 1 and "
                                                                     "lr_schedule.decay_samples 64"),
    (["train.tokens=-1"], "train.tokens must be >= 0, got -1"),
    (["train.tokens=3e11"], "config key train.tokens must be an integer, got '3e11'"),
])
def test_conflicting_budgets_are_one_line_errors(overrides, needle):
    with pytest.raises(SiftError, match=needle) as e:
        load_config(TINY, overrides)
    assert "\n" not in str(e.value)


def test_a_later_layer_replaces_the_unit(tmp_path):
    (tmp_path / "base.yaml").write_text(f"include: {TINY}\ntrain:\n  steps: 7\nlr_schedule:\n  warmup_steps: 3\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\ntrain:\n  tokens: 5120\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.tokens, cfg.train.steps, cfg.lr_schedule.warmup_steps) == (5120, 10, 3)
    assert load_config(tmp_path / "child.yaml", ["train.steps=4"]).train.steps == 4  # an override wins
    assert load_config(tmp_path / "child.yaml", ["train.steps=4"]).train.tokens is None
    (tmp_path / "both.yaml").write_text(f"include: {TINY}\ntrain:\n  steps: 7\n  samples: 64\n")
    with pytest.raises(SiftError, match=r"train.steps 7 and train.samples 64 are both set in .*both.yaml"):
        load_config(tmp_path / "both.yaml")


def test_resolved_config_reloads_to_the_same_run(tmp_path):
    cfg = load_config(TINY, ["train.tokens=5120", "lr_schedule.warmup_tokens=640", "lr_schedule.decay_tokens=4096"])
    save_resolved(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "steps" not in saved["train"] and "warmup_steps" not in saved["lr_schedule"]  # derived, not given
    assert load_config(tmp_path / "config.yaml") == cfg
    steps = load_config(TINY, ["train.steps=5"])
    save_resolved(steps, tmp_path / "steps.yaml")
    assert load_config(tmp_path / "steps.yaml") == steps


def _lrs(cfg, n):
    from sift_megatron.training.engine import lr_lambda

    f = lr_lambda(cfg)
    return [f(i) for i in range(n)]


def test_lr_schedule_in_tokens_equals_steps_and_follows_tokens():
    steps = load_config(TINY, ["train.steps=40", "lr_schedule.warmup_steps=4", "lr_schedule.decay_steps=30"])
    tokens = load_config(TINY, ["train.tokens=20480", "lr_schedule.warmup_tokens=2048",
                                "lr_schedule.decay_tokens=17408"])  # warm-up 4 steps, decay ends at step 34
    assert tokens.train.steps == 40 and _lrs(tokens, 41) == _lrs(steps, 41)  # exactly the per-step schedule
    samples = load_config(TINY, ["train.samples=320", "lr_schedule.warmup_samples=32",
                                 "lr_schedule.decay_samples=272"])
    assert _lrs(samples, 41) == _lrs(steps, 41)
    # doubling the batch keeps the schedule a function of the tokens consumed: step k at 16 = step 2k at 8
    double = load_config(TINY, ["train.tokens=20480", "lr_schedule.warmup_tokens=2048",
                                "lr_schedule.decay_tokens=17408", "train.global_batch_size=16"])
    assert double.train.steps == 20
    small, big = _lrs(tokens, 41), _lrs(double, 21)
    for k in range(2, 21):  # after the warm-up
        assert big[k] == small[2 * k], k
    assert max(small) == max(big) == 1.0 and small.index(1.0) == 3 and big.index(1.0) == 1


def test_gpt3_configs_are_in_the_papers_tokens():
    for size, gbs in (("125m", 256), ("1.3b", 512), ("175b", 1536)):
        cfg = load_config(REPO / "configs" / "gpt3" / size / "dense.yaml")
        t, s = cfg.train, cfg.lr_schedule
        assert (t.tokens, s.warmup_tokens, s.decay_tokens, t.global_batch_size) == (300e9, 375e6, 260e9, gbs)
        assert t.steps == -(-300_000_000_000 // (gbs * 2048))


def test_train_prints_and_runs_the_derived_steps(tmp_path):
    proc = run_sift(["train", str(TINY), "data.mock=true", "train.tokens=1600", "lr_schedule.warmup_tokens=1024",
                     f"train.out_dir={tmp_path / 'r'}", "train.save=false", "logging.progress=false",
                     "logging.tensorboard=false"], env={"OMP_NUM_THREADS": "1"})
    assert "budget: 4 steps x 8 samples x 64 tokens = 32 samples, 2,048 tokens; LR warm-up 1,024 tokens" in proc.stdout
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    cfg = load_config(TINY, ["data.mock=true", "train.tokens=1600", "lr_schedule.warmup_tokens=1024"])
    assert [r["lr"] for r in train] == pytest.approx([cfg.optimizer.lr * m for m in _lrs(cfg, 4)], rel=1e-12)
    out = run_sift(["check", str(TINY), "train.tokens=1600", f"train.out_dir={tmp_path / 'x'}", "--print-out-dir"])
    assert out.stdout.strip() == str(tmp_path / "x")  # launch/slurm reads this line: nothing else printed
