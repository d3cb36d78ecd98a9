"""The import graph of sift_megatron reads one way (issue 20): every import, also inside functions, goes to a
lower floor. docs/ARCHITECTURE.md shows the floors as a diagram generated from the code by this module
(`python -m tests.test_layering` prints it); the test checks that the document is current."""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lowest first. A module's floor is its top-level name under sift_megatron/ (a package or a module).
FLOORS = [
    ("errors", ["errors"]),
    ("collectives, optional extras", ["comm", "extras"]),
    ("mask pattern", ["pattern"]),
    ("config", ["config"]),
    ("layout rules", ["layout"]),
    ("devices, shards", ["platform", "sharding", "shards"]),
    ("sparse layers, masks, top-k", ["sparse"]),
    ("Sparse-IFT families, FLOPs, plan", ["ift"]),
    ("GPT model", ["models"]),
    ("dynamic sparse training", ["dst"]),
    ("checks before writes", ["preflight"]),
    ("spectral analysis", ["spectral"]),
    ("training", ["training"]),
    ("export, eval", ["convert"]),
    ("quickstart", ["quickstart"]),
    ("command line", ["cli", "__init__", "__main__"]),
]
LEVEL = {name: i for i, (_, names) in enumerate(FLOORS) for name in names}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(from floor, to floor) -> the files with such an import."""
    edges: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for f in sorted((REPO / "sift_megatron").rglob("*.py")):
        rel = f.relative_to(REPO)
        src = _floor(".".join(rel.with_suffix("").parts))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sift_megatron":
                targets = ([node.module] if node.module != "sift_megatron"
                           else [f"sift_megatron.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("sift_megatron.")]
            else:
                continue
            for t in targets:
                dst = _floor(t)
                if dst != src:
                    edges[(src, dst)].append(str(rel))
    return edges


def diagram() -> str:
    """A mermaid flowchart: one box per floor (top: command line), an arrow where a floor imports a lower one."""
    edges = import_edges()
    lines = ["```mermaid", "flowchart TD"]
    for i, (title, names) in reversed(list(enumerate(FLOORS))):
        lines.append(f'    F{i}["{title}: {", ".join(n for n in names if not n.startswith("_"))}"]')
    for a, b in sorted({(LEVEL[s], LEVEL[d]) for s, d in edges}, reverse=True):
        lines.append(f"    F{a} --> F{b}")
    lines.append("```")
    return "\n".join(lines)


def test_every_import_goes_down_a_floor():
    edges = import_edges()
    unknown = sorted({n for e in edges for n in e if n not in LEVEL})
    assert not unknown, f"modules without a floor (add them to FLOORS): {unknown}"
    upward = {e: files for e, files in edges.items() if LEVEL[e[0]] <= LEVEL[e[1]]}
    assert not upward, "imports that go up or sideways: " + "; ".join(
        f"{s} -> {d} in {sorted(set(f))}" for (s, d), f in upward.items())


def test_architecture_doc_shows_the_current_graph():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert diagram() in doc, "docs/ARCHITECTURE.md is stale: paste the output of `python -m tests.test_layering`"


if __name__ == "__main__":
    sys.stdout.write(diagram() + "\n")
