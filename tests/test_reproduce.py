"""benchmarks/reproduce.py records a command without one machine's paths."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def test_recorded_command_has_repo_relative_paths_and_placeholders():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--steps", "150", "--out", "/scratch/someone/repro", "--results", str(REPO / "docs" / "RESULTS.md"),
            "--out=/elsewhere", f"data.tokenizer={REPO / 'data' / 'tok'}", "data.cache_dir=/abs/cache", "--only", "dense"]
    assert mod.portable_args(argv) == ["--steps", "150", "--out", "<out dir>", "--results", "docs/RESULTS.md",
                                       "--out=<out dir>", "data.tokenizer=data/tok", "data.cache_dir=<path>",
                                       "--only", "dense"]
