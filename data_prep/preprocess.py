"""Tokenize corpora into Megatron IndexedDataset files (`sift data preprocess`).

Pipeline: the main process streams documents (`corpus.iter_documents`), groups them into ~256 KB
chunks, and hands chunks to a pool of worker processes (`encode.encode_chunk`, forked on Linux);
results come back in submission order through a bounded window (so memory stays flat and output never
depends on worker timing), and the main process routes each document to its split/shard and writes it
with megatron-core's `IndexedDatasetBuilder`. With 1 worker everything runs in-process. Output with N
workers is byte-identical to 1 worker because routing depends only on document order and lengths.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from data_prep import atomic
from data_prep.corpus import (
    ReadStats,
    describe_inputs,
    iter_documents,
    known_size,
    resolve_inputs,
    validate_sources,
)
from data_prep.encode import encode_chunk, init_worker
from data_prep.hf_tokenizer import TokenizerRef, resolve
from sift_megatron.errors import SiftError, deferred_sigint, fault_point, first_line

SPLIT_NAMES = ("train", "valid", "test")
CHUNK_CHARS = 256 * 1024  # big enough that IPC is noise, small enough to balance 2+ workers
CHUNK_MAX_DOCS = 4096
WINDOW_PER_WORKER = 3  # chunks in flight per worker


@dataclass
class OutputStats:
    """One written dataset: megatron prefix (PREFIX.bin / PREFIX.idx) and what went into it."""

    prefix: str
    documents: int = 0
    tokens: int = 0


@dataclass
class PreprocessSummary:
    """Totals over all outputs (tokens include one EOD per document)."""

    documents: int
    tokens: int
    bytes: int
    replaced_chars: int
    empty_skipped: int
    binary_skipped: int
    seconds: float
    dtype: str
    workers: int
    outputs: list[OutputStats] = field(default_factory=list)
    eod: int | None = None  # the tokenizer's end-of-document id, appended to every document

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- options
def parse_split(spec: str | None) -> list[Fraction] | None:
    """'98,1,1' -> normalised weights for train/valid/test (1 to 3 values; zeros drop that split)."""
    if spec is None or spec == "":
        return None
    parts = spec.split(",")
    try:
        weights = [Fraction(p.strip()) for p in parts]
    except (ValueError, ZeroDivisionError):
        raise SiftError(f"--split '{spec}' must be 1-3 comma-separated non-negative numbers, "
                        "e.g. 98,1,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) == 0:
        raise SiftError(f"--split '{spec}' must be 1-3 comma-separated non-negative numbers with a positive "
                        "sum, e.g. 98,1,1")
    total = sum(weights)
    return [w / total for w in weights]


def check_out_prefix(out: str | Path) -> Path:
    """The prefix must name files in an existing, writable directory (we never create directories for
    data: a typo should fail now, not after an hour of tokenizing)."""
    text = str(out)
    prefix = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or prefix.name in ("", ".", "..") or prefix.is_dir():
        raise SiftError(f"--out '{text}' is a directory; give a file prefix such as {prefix / 'corpus'}")
    if prefix.suffix in (".bin", ".idx"):
        raise SiftError(f"--out '{text}' should be a prefix without {prefix.suffix}, "
                        f"e.g. {prefix.with_suffix('')}")
    parent = prefix.parent
    if not parent.is_dir():
        raise SiftError(f"--out '{text}': directory '{parent}' does not exist; create it first")
    from sift_megatron.preflight import check_writable_dir

    check_writable_dir(parent, "--out")  # a real write probe: os.access says yes to root on read-only mounts
    return prefix


def output_names(prefix_name: str, splits: list[Fraction] | None, shards: int) -> list[tuple[int, str]]:
    """(split index, file prefix name) of every output; shards are `NAME-00000-of-00004`."""
    split_ids = [0] if splits is None else [i for i, w in enumerate(splits) if w > 0]
    names = []
    for s in split_ids:
        base = prefix_name if splits is None else f"{prefix_name}_{SPLIT_NAMES[s]}"
        for k in range(shards):
            names.append((s, base if shards == 1 else f"{base}-{k:05d}-of-{shards:05d}"))
    return names


class Router:
    """Deterministic document -> output assignment from document order and length only.

    Splits interleave documents so every prefix of the stream is split as close to the weights as
    possible (streaming: the total is unknown). Within a split, a document goes to the shard holding the
    fewest tokens (ties: lowest index), which balances shards by tokens rather than by documents.
    """

    def __init__(self, splits: list[Fraction] | None, shards: int):
        self.weights = splits or [Fraction(1)]
        self.shards = shards
        self.active = [i for i, w in enumerate(self.weights) if w > 0]
        self.split_docs = [0] * len(self.weights)
        self.shard_tokens = [[0] * shards for _ in self.weights]
        self.seen = 0
        self._slot = {s: j for j, s in enumerate(self.active)}

    def route(self, n_tokens: int) -> int:
        """Index into `output_names(...)` for the next document."""
        if len(self.active) == 1 and self.shards == 1:
            return 0
        self.seen += 1
        split = max(self.active, key=lambda s: (self.weights[s] * self.seen - self.split_docs[s], -s))
        self.split_docs[split] += 1
        tokens = self.shard_tokens[split]
        shard = tokens.index(min(tokens))
        tokens[shard] += n_tokens
        return self._slot[split] * self.shards + shard


# --------------------------------------------------------------------------------------------- pipeline
def _chunks(docs: Iterable[str], stats: ReadStats) -> Iterator[tuple[list[str], int]]:
    """Group documents into chunks of about CHUNK_CHARS; each with the input bytes it consumed."""
    buf: list[str] = []
    size = 0
    consumed = 0
    for doc in docs:
        buf.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS or len(buf) >= CHUNK_MAX_DOCS:
            yield buf, stats.input_bytes - consumed
            consumed = stats.input_bytes
            buf, size = [], 0
    if buf:
        yield buf, stats.input_bytes - consumed


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux): a worker starts in milliseconds and needs only what is already
    loaded. spawn re-imports the caller's `__main__` in every worker, which costs seconds when that
    script imports torch/megatron at the top. Workers never touch torch, so its threads are no concern."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _encoder(spec: tuple, workers: int):
    """A function chunks -> (tokens, lengths, input bytes) per chunk, in input order.

    Created before the progress bar so no extra threads exist when workers are forked.
    """
    if workers == 1:
        init_worker(spec, "int32")

        def serial(chunks: Iterator[tuple[list[str], int]]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
            for texts, nbytes in chunks:
                yield (*encode_chunk(texts), nbytes)

        yield serial
        return

    with _pool_context().Pool(workers, initializer=init_worker, initargs=(spec, "int32")) as pool:

        def parallel(chunks: Iterator[tuple[list[str], int]]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
            pending: collections.deque = collections.deque()
            for texts, nbytes in chunks:
                pending.append((pool.apply_async(encode_chunk, (texts,)), nbytes))
                if len(pending) >= WINDOW_PER_WORKER * workers:
                    result, n = pending.popleft()
                    yield (*result.get(), n)
            while pending:
                result, n = pending.popleft()
                yield (*result.get(), n)

        yield parallel


class _Writer:
    """One megatron `IndexedDatasetBuilder` per output, created on the first document (so the megatron
    import, seconds on a small machine, is paid only when there is something to write)."""

    def __init__(self, tmp: Path, names: list[tuple[int, str]], vocab_size: int, router: Router):
        # torch's import, inside the temp directory's cleanup: a Ctrl-C there waits for it (deferred_sigint)
        with warnings.catch_warnings(), deferred_sigint():  # megatron.core warns at import that TE is absent
            warnings.simplefilter("ignore")
            fault_point("megatron_import")
            from megatron.core.datasets.indexed_dataset import (
                DType,
                IndexedDatasetBuilder,
                get_bin_path,
                get_idx_path,
            )
        self._idx_path = get_idx_path
        self.dtype = DType.optimal_dtype(vocab_size)
        self.paths = [str(tmp / name) for _, name in names]
        self.builders = [IndexedDatasetBuilder(get_bin_path(p), dtype=self.dtype) for p in self.paths]
        self.stats = [OutputStats(prefix=name) for _, name in names]
        self.router = router

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        start = 0
        for n in lengths.tolist():
            k = self.router.route(n)
            self.builders[k].add_document(tokens[start:start + n], [n])
            self.stats[k].documents += 1
            self.stats[k].tokens += n
            start += n

    def finalize(self) -> None:
        for builder, path in zip(self.builders, self.paths):
            builder.finalize(self._idx_path(path))

    def close(self) -> None:
        for builder in self.builders:
            builder.data_file.close()


def encoder_spec(ref: TokenizerRef) -> tuple[tuple, int, int]:
    """(what `encode.init_worker` takes, unpadded vocabulary size, EOD id) of a resolved tokenizer."""
    if ref.kind == "hf":
        from data_prep import hf_tokenizer

        backend = hf_tokenizer.load_backend(ref)
        eod, _ = hf_tokenizer.eod_token(ref, backend)
        return ("hf", backend.to_str(), eod), backend.get_vocab_size(with_added_tokens=True), eod
    import sentencepiece as spm

    proto = ref.path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise SiftError(f"tokenizer '{ref.spec}' cannot be read ({first_line(e)})") from None
    if sp.eos_id() < 0:
        raise SiftError(f"tokenizer '{ref.spec}' has no end-of-document piece (</s>)")
    return ("sentencepiece", proto), sp.get_piece_size(), sp.eos_id()


def preprocess(inputs: list[str], tokenizer: str | Path, out: str | Path, *, workers: int = 1,
               shards: int = 1, json_key: str = "text", split: str | None = None, hf_split: str = "train",
               progress: bool = True, max_docs: int | None = None, max_bytes: int | None = None) -> PreprocessSummary:
    """Tokenize `inputs` with `tokenizer` (anything `hf_tokenizer.resolve` accepts) into
    `out[_split][-shard].{bin,idx}`."""
    if workers < 1:
        raise SiftError(f"--workers {workers} must be >= 1")
    if shards < 1:
        raise SiftError(f"--shards {shards} must be >= 1")
    splits = parse_split(split)
    prefix = check_out_prefix(out)
    sources = resolve_inputs(inputs)
    validate_sources(sources, json_key)
    spec, vocab_size, eod = encoder_spec(resolve(tokenizer))

    from tqdm import tqdm

    names = output_names(prefix.name, splits, shards)
    for _, name in names:
        for ext in (".bin", ".idx"):
            if (prefix.parent / (name + ext)).is_dir():
                raise SiftError(f"--out '{out}': {prefix.parent / (name + ext)} is a directory; give a prefix whose "
                                ".bin/.idx names are free or earlier outputs")
    router = Router(splits, shards)
    stats = ReadStats()
    started = time.perf_counter()
    writer: _Writer | None = None
    with atomic.temp_dir_for(prefix) as tmp, _encoder(spec, workers) as encode:
        bar = tqdm(total=known_size(sources), unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
                   disable=None if progress else True)
        try:
            docs = iter_documents(sources, json_key, stats, hf_split, max_docs=max_docs, max_bytes=max_bytes)
            n_docs = n_tokens = 0
            for tokens, lengths, nbytes in encode(_chunks(docs, stats)):
                if writer is None:
                    writer = _Writer(tmp, names, vocab_size, router)
                writer.add(tokens, lengths)
                n_docs += len(lengths)
                n_tokens += tokens.size
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{n_docs / elapsed:,.0f} docs/s, {n_tokens / elapsed:,.0f} tok/s",
                                    refresh=False)
                bar.update(nbytes)
            bar.update(max(0, stats.input_bytes - bar.n))  # bytes after the last document (blank lines...)
            if writer is None:
                raise SiftError(f"no documents in inputs {describe_inputs(inputs)} (empty corpus: "
                                f"{stats.sources} source(s), {stats.empty_skipped} empty document(s))")
            writer.finalize()
        except BaseException:
            bar.leave = False
            if writer is not None:
                writer.close()
            raise
        finally:
            bar.close()
        for s, (split_id, name) in zip(writer.stats, names):
            if s.documents == 0:
                what = f"split '{SPLIT_NAMES[split_id]}'" if splits is not None else "output"
                raise SiftError(f"{what} {name} got no documents ({n_docs} in total); use fewer --shards, "
                                "a different --split or more data")
        moves = [(Path(p + ext), prefix.parent / (name + ext))
                 for ext in (".bin", ".idx") for p, (_, name) in zip(writer.paths, names)]
        atomic.publish_files(moves)
    outputs = [OutputStats(str(prefix.parent / s.prefix), s.documents, s.tokens) for s in writer.stats]
    return PreprocessSummary(documents=n_docs, tokens=n_tokens, bytes=stats.bytes,
                             replaced_chars=stats.replaced_chars, empty_skipped=stats.empty_skipped,
                             binary_skipped=stats.binary_skipped, seconds=time.perf_counter() - started,
                             dtype=np.dtype(writer.dtype).name, workers=workers, outputs=outputs,
                             eod=eod)
