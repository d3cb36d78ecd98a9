"""DST schedule: update steps and drop-fraction formulas of spec section 3.2."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sift_megatron.config import DSTConfig
from sift_megatron.dst.schedule import DSTSchedule, resolve_end
from sift_megatron.errors import SiftError


def test_defaults_follow_the_spec():
    s = DSTSchedule(total_steps=1000)
    assert (s.interval, s.begin, s.end_step, s.f0, s.decay) == (100, 0, 750, 0.3, "cosine")


def test_update_steps_are_strictly_inside_the_window():
    s = DSTSchedule(interval=100, begin=0, end=700, total_steps=1000)
    updates = [t for t in range(0, 1001) if s.is_update_step(t)]
    assert updates == [100, 200, 300, 400, 500, 600]  # not 0 (= begin), not 700 (= end)
    assert list(s.update_steps()) == updates
    s = DSTSchedule(interval=100, begin=200, end=701)
    assert [t for t in range(1001) if s.is_update_step(t)] == [300, 400, 500, 600, 700]
    assert list(s.update_steps()) == [300, 400, 500, 600, 700]


@given(st.integers(1, 50), st.integers(0, 200), st.integers(1, 300))
def test_update_steps_match_predicate(interval, begin, length):
    s = DSTSchedule(interval=interval, begin=begin, end=begin + length)
    assert list(s.update_steps()) == [t for t in range(begin + length + 1) if s.is_update_step(t)]


def test_released_gpt_recipes():
    # WikiText-103 Sparse Wide RigL: 21,511 steps, update every 500 until step 17,209: 34 updates.
    wt = DSTSchedule(interval=500, end=17209, total_steps=21511)
    assert len(wt.update_steps()) == 34
    # cstorch Cosine(init=f0, half_period=P, minimum=0) == cbsparse cosine with begin 0, end P.
    for t in wt.update_steps():
        assert wt.drop_fraction(t) == pytest.approx(0.15 + 0.15 * math.cos(math.pi * t / 17209), abs=1e-15)
    # Default end: 0.75 of the run, int() as cbsparse.
    assert DSTSchedule(total_steps=21511).end_step == int(0.75 * 21511) == 16133


@given(st.integers(0, 100), st.integers(1, 1000), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.floats(0.0, 5.0, exclude_min=True))
def test_drop_fraction_formulas(begin, length, frac, f0, rate):
    end = begin + length
    t = begin + frac * length
    p = (t - begin) / (end - begin)
    cos = DSTSchedule(begin=begin, end=end, drop_fraction=f0, decay="cosine")
    assert cos.drop_fraction(t) == pytest.approx(f0 * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert DSTSchedule(begin=begin, end=end, drop_fraction=f0, decay="constant").drop_fraction(t) == f0
    exp = DSTSchedule(begin=begin, end=end, drop_fraction=f0, decay="exponential", exponential_rate=rate)
    assert exp.drop_fraction(t) == pytest.approx(f0 * math.exp(-rate * p), abs=1e-12)


def test_schedule_rejects_what_the_config_rejects():
    """DSTSchedule asks the config's rule (dst.exponential_rate > 0), also when built directly."""
    with pytest.raises(SiftError, match=r"dst.exponential_rate.*> 0"):
        DSTSchedule(begin=0, end=100, decay="exponential", exponential_rate=0.0)


def test_cosine_endpoints_and_clamping():
    s = DSTSchedule(begin=0, end=1000, drop_fraction=0.3)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(1000) == pytest.approx(0.0, abs=1e-15)
    assert s.drop_fraction(5000) == s.drop_fraction(1000)  # outside the window: clamped
    assert s.drop_fraction(-5) == s.drop_fraction(0)


def test_end_resolution():
    assert resolve_end(0.75, 1000) == 750
    assert resolve_end(500, None) == 500
    assert resolve_end(500.0, 10) == 500  # >= 1 is a step even past the run
    with pytest.raises(SiftError, match="total number of steps"):
        resolve_end(0.5, None)
    with pytest.raises(SiftError):
        resolve_end(12.5, 100)


def test_from_config():
    cfg = DSTConfig(algorithm="rigl", interval=50, begin=10, end=0.5, drop_fraction=0.2, decay="exponential",
                    exponential_rate=2.0)
    s = DSTSchedule.from_config(cfg, total_steps=400)
    assert (s.interval, s.begin, s.end_step, s.f0, s.decay, s.exponential_rate) == (50, 10, 200, 0.2,
                                                                                    "exponential", 2.0)


@pytest.mark.parametrize("kwargs", [
    {"interval": 0}, {"begin": -1}, {"drop_fraction": 1.5}, {"decay": "linear"}, {"end": 100, "begin": 100},
    {"end": 0.001, "total_steps": 100},
])
def test_errors_are_one_line_sift_errors(kwargs):
    with pytest.raises(SiftError) as err:
        DSTSchedule(**{"total_steps": 1000, **kwargs})
    assert "\n" not in str(err.value)


def test_load_config_checks_the_window_before_training():
    """load_config runs the schedule's own check for RigL / SET, so `sift train` fails before writing anything;
    static masks have no window to check."""
    from sift_megatron.config import load_config
    from tests.conftest import REPO

    tiny = REPO / "configs" / "tiny" / "dense.yaml"
    rigl = ["sparsity.family=wide", "sparsity.s=0.5", "dst.algorithm=rigl"]
    for bad, needle in ((["dst.end=12.5"], "whole step when >= 1, got 12.5"),
                        (["dst.begin=10", "dst.end=10"], r"dst.end \(step 10\) must come after dst.begin \(step 10\)"),
                        (["train.steps=1"], r"dst.end \(step 0\) must come after")):
        with pytest.raises(SiftError, match=needle):
            load_config(tiny, [*rigl, *bad])
    assert load_config(tiny, ["train.steps=1"]).dst.algorithm == "static"
