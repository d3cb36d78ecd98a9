"""Mask structure (`sparsity.pattern`, `sparsity.block`), parsed without torch so configs and `sift flops` can
check it.

unstructured: any element may be kept. block: nonzeros come in whole b x b tiles of the [out, in] weight (tile
(i, j) covers rows [i b, (i + 1) b) and columns [j b, (j + 1) b)); block=1 is unstructured. n:m: exactly n
nonzeros in every group of m consecutive input elements (columns), so the density is n/m.
"""

from __future__ import annotations

from dataclasses import dataclass

from sift_megatron.errors import SiftError

__all__ = ["KERNEL_BLOCKS", "Pattern", "check_kernel", "parse_pattern"]

KERNEL_BLOCKS = (16, 32, 64, 128)  # tile sides the block kernels take: tl.dot needs >= 16; 128 still fits registers


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "block" | "nm"
    block: int = 1  # tile side (kind block); 1 otherwise
    n: int = 0  # kind nm: n kept of every m
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "block": f"block {self.block}x{self.block}"}.get(
            self.kind, f"{self.n}:{self.m}")


def parse_pattern(pattern: object, block: object = 1) -> Pattern:
    """`sparsity.pattern` and `sparsity.block` -> Pattern; a one-line error naming the bad value otherwise.
    pattern=block with block=1 is unstructured (every element its own tile)."""
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 1):
        raise SiftError(f"sparsity.block must be a positive integer (1 = unstructured, e.g. 16, 32, 64, 128), "
                        f"got {block!r}")
    if pattern == "unstructured" or (pattern == "block" and block == 1):
        if block != 1:
            raise SiftError(f"sparsity.block={block} needs sparsity.pattern=block, got {pattern!r}")
        return Pattern("unstructured")
    if pattern == "block":
        return Pattern("block", block=block)
    n_m = str(pattern).split(":") if isinstance(pattern, str) else []
    if len(n_m) == 2 and all(x.isdigit() for x in n_m) and 0 < int(n_m[0]) < int(n_m[1]):
        if block != 1:
            raise SiftError(f"sparsity.block={block} needs sparsity.pattern=block, got {pattern!r}")
        return Pattern("nm", n=int(n_m[0]), m=int(n_m[1]))
    raise SiftError(f"sparsity.pattern must be unstructured, block or N:M with 0 < N < M (e.g. 2:4), got {pattern!r}")


def check_kernel(kernel: str, pattern: Pattern, family: str) -> None:
    """sparsity.kernel=block computes over whole tiles of KERNEL_BLOCKS sides: a one-line error otherwise. It runs
    at the Sparse{Column,Row}ParallelLinear seam, so it covers every sparse family; dense has nothing to run."""
    if kernel != "block":
        return
    if family == "dense":
        raise SiftError("sparsity.kernel=block needs a sparse family (wide, parallel, factorized or doped), got "
                        "sparsity.family=dense; use sparsity.kernel=masked")
    if pattern.kind != "block" or pattern.block not in KERNEL_BLOCKS:
        got = f"sparsity.pattern=block, sparsity.block={pattern.block}" if pattern.kind == "block" else (
            "sparsity.pattern=" + ("unstructured" if pattern.kind == "unstructured" else f"{pattern.n}:{pattern.m}"))
        raise SiftError(f"sparsity.kernel=block needs sparsity.pattern=block with sparsity.block in "
                        f"{', '.join(map(str, KERNEL_BLOCKS))}, got {got}")
