"""benchmarks/reproduce.py: the study's arithmetic (budget plan, frontier, verdict) on known numbers, and its
shortened run (--smoke) end to end: dense sweep, LR pick, seed aggregation, verdict, both plots, JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def _mod():
    """benchmarks/reproduce.py as a module (registered first: its dataclasses look their module up)."""
    if "reproduce" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["reproduce"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["reproduce"]


def test_recorded_command_has_repo_relative_paths_and_placeholders():
    mod = _mod()
    argv = ["--steps", "150", "--out", "/scratch/someone/repro", "--results", str(REPO / "docs" / "RESULTS.md"),
            "--out=/elsewhere", f"data.tokenizer={REPO / 'data' / 'tok'}", "data.cache_dir=/abs/cache", "--only", "dense"]
    assert mod.portable_args(argv) == ["--steps", "150", "--out", "<out dir>", "--results", "docs/RESULTS.md",
                                       "--out=<out dir>", "data.tokenizer=data/tok", "data.cache_dir=<path>",
                                       "--only", "dense"]


def test_rigl_gets_at_least_the_asked_mask_updates():
    from sift_megatron.dst.schedule import DSTSchedule

    mod = _mod()
    for steps in (40, 150, 333, 2000):
        k = mod.rigl_interval(steps, 20)
        n = len(DSTSchedule(interval=k, end=0.75, total_steps=steps).update_steps())
        assert n >= 20 and len(DSTSchedule(interval=k + 1, end=0.75, total_steps=steps).update_steps()) < 20
    assert mod.rigl_interval(8, 20) == 1  # too short for 20: every step


def test_budget_plan_fits_and_estimates_the_schedule():
    mod = _mod()
    shapes = {"a": mod.Shape((), (1, 2), 1, 10, "default:1MB", 0.25, 1),
              "b": mod.Shape((), (1, 2), 1, 10, "default:1MB", 0.75, 1)}
    arms = {"a": {"dense_w1": [], "dense_w2": []}, "b": {"dense_w1": [], "dense_w2": []}}
    runs = [{"shape": s, "arm": a, "steps": 10, "wall_s": 12.0 + 10 * (1.0 if a == "dense_w1" else 3.0),
             "step_s": 1.0 if a == "dense_w1" else 3.0} for s in shapes for a in arms[s]]
    cal = mod.calibration_table(runs, lambda s, a: pytest.fail("only Sparse Wide s=0.75 is analysed"))
    assert cal[("a", "dense_w1")] == (12.0, 1.0, 0.0) and cal[("b", "dense_w2")] == (12.0, 3.0, 0.0)
    # 2 LRs + 1 more seed = 3 runs per arm; per shape fixed 2 x 3 x 12 = 72 s, 3 x (1 + 3) = 12 s per step;
    # budget 1000 s on 2 workers: a gets (0.25 x 2000 - 72) // 12 = 35 steps, b (1500 - 72) // 12 = 119
    steps, est = mod.plan_steps(cal, shapes, arms, 1000, 2, 2, 2, 0, 5, 10_000)
    assert steps == {"a": 35, "b": 119}
    assert est == pytest.approx(mod.estimate(cal, arms, steps, 2, 2, 2, 0))
    work = sum(3 * (12 + steps[s] * c) for s in steps for c in (1.0, 3.0))
    assert work / 2 <= est <= 1000 * 1.15  # no better than perfect packing, close to the budget
    assert mod.plan_steps(cal, shapes, arms, 1, 2, 2, 2, 0, 5, 10_000)[0] == {"a": 5, "b": 5}  # clamped
    assert mod.makespan([3, 3, 2, 2], 2) == 5 and mod.makespan([], 2) == 0
    assert 0 < mod.spectral_cost(mod.SMOKE["smoke"], "wide_s75_rigl") < 30  # one in-process analysis, timed


def test_frontier_interpolates_in_log_flops_and_calls_only_clear_wins():
    mod = _mod()
    pts = [(1e9, 6.0, 0.01), (4e9, 5.0, 0.03), (1.6e10, 4.5, 0.01)]
    loss, se = mod.frontier_at(pts, 2e9)  # half-way in log between 1e9 and 4e9
    assert loss == pytest.approx(5.5) and se == pytest.approx(0.02)
    assert mod.frontier_at(pts, 5e8) is None and mod.frontier_at(pts, 2e10) is None
    assert mod.dense_flops_for(pts, 5.5) == pytest.approx(2e9)
    assert mod.dense_flops_for(pts, 4.0) is None
    # a wider dense model that does worse than a narrower one is off the frontier: flat after the best
    bumpy = [(1e9, 6.0, 0.01), (2e9, 5.0, 0.02), (4e9, 5.2, 0.03), (8e9, 5.5, 0.01)]
    assert mod.pareto(bumpy) == bumpy[:2]
    assert mod.frontier_at(bumpy, 6e9) == (5.0, 0.02) and mod.frontier_at(bumpy, 9e9) is None
    assert mod.dense_flops_for(bumpy, 5.1) == pytest.approx(math.exp(math.log(1e9) + 0.9 * math.log(2)))
    assert (mod.call(-0.1, 0.04), mod.call(-0.1, 0.06), mod.call(0.1, 0.04)) == ("yes", "tie", "no")

    shapes = {"t": mod.Shape((), (32, 64, 128), 32, 10, "default:1MB", 1.0, 1)}
    agg = {"t": {"dense_w32": {"mean": 6.0, "se": 0.01, "train_flops": 1e9},
                 "dense_w64": {"mean": 5.0, "se": 0.03, "train_flops": 4e9},
                 "dense_w128": {"mean": 4.5, "se": 0.01, "train_flops": 1.6e10},
                 "wide": {"mean": 5.4, "std": 0.02, "n": 3, "se": 0.02 / math.sqrt(3), "train_flops": 2e9}}}
    v = mod.verdict(agg, shapes)["t"]["wide"]
    assert v["iso_delta"] == pytest.approx(-0.6) and v["beats_iso"] == "yes"
    assert v["whole_model_flop_ratio"] == pytest.approx(2.0)
    assert v["frontier_delta"] == pytest.approx(-0.1) and v["beats_frontier"] == "yes"
    assert v["frontier_se"] == pytest.approx(math.hypot(0.02 / math.sqrt(3), 0.02))
    assert v["dense_flops_multiplier"] == pytest.approx(math.exp(math.log(1e9) + 0.6 * math.log(4)) / 2e9)
    agg["t"]["wide"]["mean"] = 4.0  # better than the widest dense model: a lower bound on the compute saved
    v = mod.verdict(agg, shapes)["t"]["wide"]
    assert v["dense_flops_multiplier"] is None and v["dense_flops_multiplier_above"] == pytest.approx(8.0)


def test_splice_replaces_only_the_marked_block(tmp_path):
    mod = _mod()
    f = tmp_path / "R.md"
    f.write_text(f"# head\n\n{mod.BEGIN}\nold\n{mod.END}\n\n## tail\n")
    mod.splice(f, "new table")
    assert f.read_text() == f"# head\n\n{mod.BEGIN}\nnew table\n{mod.END}\n\n## tail\n"


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    """The shortened study (2-layer model, 3 dense widths, Sparse Wide s=0.75 static and RigL, 2 LRs, 2 seeds,
    8 steps): every code path of the full one, and a second call reuses every run."""
    out, res = tmp_path / "study", tmp_path / "RESULTS.md"
    res.write_text("# Results\n")
    cmd = [sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--smoke", "--out", str(out), "--results",
           str(res)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    ver = line["verdict"]["smoke"]
    assert set(ver) == {"wide_s75_static", "wide_s75_rigl"} and line["steps"] == {"smoke": 8}
    for v in ver.values():
        assert v["beats_iso"] in ("yes", "no", "tie") and v["n"] == 2
        assert v["whole_model_flop_ratio"] > 1  # Sparse Wide's widened embedding/attention/LM head cost more

    runs = json.loads((out / "results.json").read_text())
    assert len(runs) == 5 * 2 + 5 * 1  # 5 arms x (2 LRs at seed 0 + 1 more seed)
    for arm in ("dense_w16", "dense_w32", "dense_w64", "wide_s75_static", "wide_s75_rigl"):
        grid = {r["lr"]: r["val_loss"] for r in runs if r["arm"] == arm and r["seed"] == 0}
        best = min(grid, key=grid.get)
        seeds = [r for r in runs if r["arm"] == arm and r["lr"] == best]
        assert sorted(r["seed"] for r in seeds) == [0, 1]  # the other seed ran at the grid's best LR
        assert not [r for r in runs if r["arm"] == arm and r["seed"] == 1 and r["lr"] != best]
    flops = {r["arm"]: r["train_flops"] for r in runs}
    assert flops["dense_w16"] < flops["dense_w32"] < flops["dense_w64"]
    rigl = [r for r in runs if r["arm"] == "wide_s75_rigl"]
    assert all(r["dst_updates"] == 5 for r in rigl)  # every step before 75 % of 8
    for arm in ("wide_s75_static", "wide_s75_rigl"):  # spectra at steps 2, 4, 6, 8 of every seed
        assert all([s[0] for s in r["spectral"]] == [2, 4, 6, 8] for r in runs if r["arm"] == arm)
    static = [r for r in runs if r["arm"] == "wide_s75_static" and r["seed"] == 0]
    assert all(len({s[1] for s in r["spectral"]}) == 1 for r in static)  # a static mask's delta_r never moves

    report = (out / "report.md").read_text()
    assert "| wide_s75_rigl |" in report and "vs dense frontier" in report and "delta_r" in report
    assert res.read_text().startswith("# Results\n") and report.strip() in res.read_text()
    from PIL import Image

    for png in ("frontier.png", "spectral.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200

    t0 = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["verdict"] == line["verdict"]
    assert time.perf_counter() - t0 < 60  # nothing retrained
