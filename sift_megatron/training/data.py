"""Training data: Megatron .bin/.idx prefixes (blends, split) through megatron-core's GPTDataset.

Sample order is global and independent of the parallel layout: global batch b holds samples
[b*G, (b+1)*G) of the train split, cut into micro-batches; data-parallel rank r of DP takes every DP-th
micro-batch slice, so DP=2 x accum=A sees exactly the samples of DP=1 x accum=2A.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sift_megatron.config import Config
from sift_megatron.errors import SiftError, first_line
from sift_megatron.layout import padded_vocab_size  # noqa: F401 - the trainer's rule


class _MockTokenizer:
    """What GPTDataset needs of a tokenizer (vocab_size, eod). Mock data: megatron's MockGPTDataset ends its
    documents with id 0. Real data without data.tokenizer: the EOD id is unknown (None); training does not use
    it (no position/attention resets, no EOD loss mask) and `sift convert` then asks for --tokenizer."""

    def __init__(self, vocab_size: int, eod: int | None) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "mock", "vocab_size": vocab_size}


def load_tokenizer(cfg: Config):
    """`data.tokenizer`: ours, a sentencepiece model or a Hugging Face tokenizer (data_prep.hf_tokenizer)."""
    if cfg.data.mock or not cfg.data.tokenizer:
        return None
    from data_prep.tokenizer import load_tokenizer as _load

    return _load(cfg.data.tokenizer)


def base_vocab_size(cfg: Config, tokenizer) -> int:
    if cfg.model.vocab_size:
        if tokenizer is not None and cfg.model.vocab_size < tokenizer.vocab_size:
            raise SiftError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the vocabulary of "
                            f"data.tokenizer {cfg.data.tokenizer!r} ({tokenizer.vocab_size}); unset it or raise it")
        return cfg.model.vocab_size
    if tokenizer is not None:
        return tokenizer.vocab_size
    if cfg.data.mock:
        return cfg.data.mock_vocab_size
    raise SiftError("set data.tokenizer (the tokenizer the data was made with: a `sift data tokenizer` or "
                    "Hugging Face tokenizer directory, or a name in the local Hugging Face cache), "
                    "model.vocab_size or data.mock=true")


def _parse_blend(prefixes: list) -> tuple[list[str], list[float] | None]:
    if not prefixes:
        raise SiftError("data.prefixes is empty: give Megatron .bin/.idx prefixes or set data.mock=true")
    if len(prefixes) > 1 and all(isinstance(x, (int, float)) for x in prefixes[0::2]):
        if len(prefixes) % 2:
            raise SiftError(f"data.prefixes blend must alternate weight, prefix; got {prefixes}")
        weights = [float(w) for w in prefixes[0::2]]
        paths = [str(p) for p in prefixes[1::2]]
        return paths, weights
    return [str(p) for p in prefixes], None


@dataclass
class Datasets:
    train: object
    valid: object | None
    vocab_size: int  # unpadded
    eod: int | None  # None: real data without data.tokenizer


def build_datasets(cfg: Config, tokenizer, run_dir: Path, num_train: int, num_valid: int) -> Datasets:
    """Build train/valid GPTDatasets on every rank; rank 0 writes the index cache first. The .bin/.idx files and
    the splits were checked by preflight.check_data, which the trainer runs before anything else."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset


    vocab = base_vocab_size(cfg, tokenizer)
    tok = tokenizer if tokenizer is not None else _MockTokenizer(vocab, 0 if cfg.data.mock else None)
    blend = per_split = None
    if cfg.data.mock:
        cls = MockGPTDataset
    else:
        cls = GPTDataset
        blend = _parse_blend(cfg.data.prefixes)
        if cfg.data.valid_prefixes:
            per_split = [blend, _parse_blend(cfg.data.valid_prefixes), None]
            blend = None
    cache = cfg.data.cache_dir or str(run_dir / "data_cache")
    dcfg = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=cfg.data.split if blend else None,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=cache if not cfg.data.mock else None,
        mid_level_dataset_surplus=0.005,
    )
    os.makedirs(cache, exist_ok=True)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, [num_train, num_valid, 0], lambda: True, dcfg).build()
    except (AssertionError, ValueError, IndexError) as e:
        raise SiftError(f"cannot build datasets from {cfg.data.prefixes}: {first_line(e)}") from None
    return Datasets(train, valid, vocab, tok.eod)


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        out[k] = torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples])
    return out


def micro_batches(dataset, cfg: Config, dp_rank: int, dp_size: int, start_sample: int,
                  device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless iterator of this DP rank's micro-batches, starting at global sample `start_sample`
    (resume = skip consumed samples without reading them). With data.num_workers > 0 a torch DataLoader reads
    the same index lists in that many worker processes, ahead of the step; the batches are identical."""
    indices = _index_lists(len(dataset), cfg.train.micro_batch_size, dp_rank, dp_size, start_sample)
    if cfg.data.num_workers:
        batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=_Endless(indices), collate_fn=_collate,
                                                   num_workers=cfg.data.num_workers))
    else:
        batches = (_collate([dataset[i] for i in idx]) for idx in indices)
    for batch in batches:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _index_lists(n: int, mbs: int, dp_rank: int, dp_size: int, start: int) -> Iterator[list[int]]:
    pos = start
    while True:
        first = pos + dp_rank * mbs
        yield [(first + i) % n for i in range(mbs)]
        pos += mbs * dp_size


class _Endless(torch.utils.data.Sampler):
    """A DataLoader batch_sampler over an endless iterator of index lists."""

    def __init__(self, it: Iterator[list[int]]) -> None:
        self.it = it

    def __iter__(self) -> Iterator[list[int]]:
        return self.it


