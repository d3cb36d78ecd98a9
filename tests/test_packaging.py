"""Installs: ranges (no == pins) in pyproject.toml, the exact verified set in launch/constraints.txt that
launch/setup.sh installs with, extras for optional features, and a one-line error naming the extra when one
is missing."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sift_megatron.errors import SiftError
from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CONSTRAINTS = {}
for _line in (REPO / "launch" / "constraints.txt").read_text().splitlines():
    if _line.strip() and not _line.startswith("#"):
        _name, _, _ver = _line.partition("==")
        CONSTRAINTS[canonicalize_name(_name)] = _ver.strip()


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in PYPROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("sift-megatron")]
    return reqs


def test_ranges_in_pyproject_exact_versions_in_constraints():
    for req in _requirements():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a pin, not a range"
        pinned = CONSTRAINTS.get(canonicalize_name(req.name))
        assert pinned, f"{req.name} has no exact version in launch/constraints.txt"
        assert req.specifier.contains(pinned), f"verified {req.name}=={pinned} is outside {req.specifier}"
    assert CONSTRAINTS["torch"] == "2.13.0"  # the CPU wheel on disk here; a newer one would be a CUDA download
    assert (CONSTRAINTS["megatron-core"], CONSTRAINTS["deepspeed"]) == ("0.16.1", "0.19.8")
    base = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    assert not base & {"psutil", "lm-eval", "transformers", "accelerate", "scipy", "matplotlib", "datasets", "pyarrow"}
    extras = PYPROJECT["optional-dependencies"]
    assert {"data", "convert", "eval", "analysis", "all", "dev", "wandb"} <= set(extras)
    assert "wandb" in {Requirement(r).name for r in extras["dev"]}  # CI (setup.sh: [all,dev]) runs the wandb test


def test_setup_installs_every_extra_at_the_verified_versions():
    setup = (REPO / "launch" / "setup.sh").read_text()
    installs = [ln for ln in setup.splitlines() if "pip install" in ln and "--upgrade pip" not in ln]
    assert len(installs) == 2 and all('-c "$CONSTRAINTS"' in ln for ln in installs), installs
    assert 'torch >&2' in installs[0] and '"$ROOT[all,dev]"' in installs[1]


def _installed_by_setup_from_these_files() -> bool:
    """launch/setup.sh stamps its venv with the hash of pyproject.toml + constraints.txt it installed from."""
    stamp = Path(sys.prefix) / ".sift-installed"
    files = (REPO / "pyproject.toml").read_bytes() + (REPO / "launch" / "constraints.txt").read_bytes()
    return stamp.is_file() and stamp.read_text().strip() == hashlib.sha256(files).hexdigest()


@pytest.mark.skipif(not _installed_by_setup_from_these_files(),
                    reason="not installed by launch/setup.sh from these files (e.g. a container's own torch)")
def test_setup_environment_is_the_verified_set():
    for req in _requirements():
        assert version(req.name).split("+")[0] == CONSTRAINTS[canonicalize_name(req.name)], req.name


def test_missing_extra_is_a_one_line_error(monkeypatch, tmp_path):
    from sift_megatron.convert.hf import export_hf
    from sift_megatron.convert.lmeval import run_eval
    from sift_megatron.extras import require

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SiftError, match=r"^sift convert needs transformers, not installed here: pip install "
                                        r"'sift-megatron\[convert\]'"):
        export_hf(tmp_path / "run", tmp_path / "out")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(SiftError, match=r"needs lm-eval, transformers, .*'sift-megatron\[convert,eval\]'"):
        run_eval(tmp_path / "hf", ["sift_offline_mc"])
    require("anything", "numpy", "yaml")  # installed: no error
    code = ("import sys; sys.modules['scipy'] = None\n"
            "from sift_megatron.cli import main\n"
            f"sys.exit(main(['spectral', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "sift spectral needs scipy" in proc.stderr and "sift-megatron[analysis]" in proc.stderr


def test_no_merge_conflict_markers_in_tracked_files():
    """A merge once left <<<<<<< / ======= / >>>>>>> lines in README.md unnoticed: nothing tests prose."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for name in files:
        path = REPO / name
        if path.suffix in {".png", ".bin", ".idx", ".safetensors"} or not path.is_file():
            continue
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        bad += [f"{name}:{i + 1}" for i, line in enumerate(lines)
                if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not bad, bad
