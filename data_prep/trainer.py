"""Train a sentencepiece tokenizer (`sift data tokenizer`).

Choices, and why:
* identity normalisation, no dummy prefix, whitespace kept, byte fallback: decode(encode(text)) == text
  for every string, so training data and generations round-trip exactly (code indentation included);
* documents are fed as multi-line chunks, not single lines, so "\\n" is learned as a piece (and can
  merge, e.g. ":\\n") instead of always falling back to a byte;
* large corpora are sampled here (reservoir sampling with `--seed`), because sentencepiece's own sampler
  uses a fixed seed; its results also depend on its thread count, so that is a recorded setting (not
  the machine's core count): seed + inputs + threads -> the same model file, byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep import atomic
from data_prep.corpus import ReadStats, describe_inputs, iter_documents, resolve_inputs, validate_sources
from sift_megatron.errors import SiftError

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
META_FILE = "sift_tokenizer.json"
META_FORMAT = "sift-sentencepiece-v1"
MODEL_TYPES = ("bpe", "unigram")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
EOD_ID = EOS_ID  # documents end with </s>; megatron calls it EOD
NUM_SPECIALS = 4
NUM_BYTE_PIECES = 256

DEFAULT_INPUT_SENTENCE_SIZE = 100_000  # chunks of <= 2048 chars: at most ~200 MB of text is used
DEFAULT_THREADS = 4
CHUNK_CHARS = 2048
CHARACTER_COVERAGE = 0.9995


@dataclass
class TrainSummary:
    """What `train_tokenizer` did; also stored (with the options) in the tokenizer's metadata file."""

    out: str
    model_type: str
    vocab_size: int
    seed: int
    threads: int
    input_sentence_size: int
    sentences: int  # text chunks read
    sampled: int  # chunks sentencepiece trained on
    documents: int
    bytes: int
    replaced_chars: int
    empty_skipped: int
    binary_skipped: int


def training_sentences(docs: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut documents into chunks of whole lines (newlines kept), each at most `max_chars` long."""
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if size + len(line) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if line:
                buf.append(line)
                size += len(line)
        if buf:
            yield "".join(buf)


def sample_sentences(sentences: Iterable[str], k: int, seed: int) -> list[str]:
    """Uniform sample of k items in one pass (reservoir sampling), returned in input order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, item in enumerate(sentences):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, item)
    return [item for _, item in sorted(reservoir)]


@contextlib.contextmanager
def _stderr_to(log):
    """Send file descriptor 2 (sentencepiece's C++ logging) to `log` while training."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(log.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Guarded:
    """Iterator wrapper: sentencepiece turns exceptions from Python iterators into RuntimeError; keep
    the original (a SiftError, KeyboardInterrupt) so it can be re-raised unchanged."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.error: BaseException | None = None
        self.count = 0

    def __iter__(self) -> _Guarded:
        return self

    def __next__(self) -> str:
        try:
            item = next(self._it)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise
        self.count += 1
        return item


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _user_error(message: str, vocab_size: int) -> SiftError:
    """Map sentencepiece's internal check failures to one line the user can act on."""
    if m := _TOO_HIGH.search(message):
        return SiftError(f"--vocab-size {vocab_size} is larger than this corpus supports; use a value "
                         f"<= {m.group(2)} or more text")
    if m := _TOO_LOW.search(message):
        return SiftError(f"--vocab-size {vocab_size} is too small for this corpus: it needs at least "
                         f"{m.group(2)} ({NUM_BYTE_PIECES} byte pieces, {NUM_SPECIALS} specials and its "
                         "characters)")
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return SiftError(f"sentencepiece training failed: {first}")


_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _vocab_lines(model_proto: bytes) -> str:
    """Human-readable `piece<TAB>score` lines; pieces can hold newlines/tabs, so those are escaped."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return "".join(f"{sp.id_to_piece(i).translate(_ESCAPES)}\t{sp.get_score(i):g}\n"
                   for i in range(sp.get_piece_size()))


def model_file(path: str | Path) -> Path:
    """The sentencepiece model inside a tokenizer directory (or the file itself); one-line errors."""
    path = Path(path)
    if not path.exists():
        raise SiftError(f"tokenizer '{path}' not found; create one with `sift data tokenizer`")
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise SiftError(f"tokenizer directory '{path}' has no {MODEL_FILE}; "
                        "create it with `sift data tokenizer`")
    return model


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | Path, *, model_type: str = "bpe",
                    seed: int = 0, input_sentence_size: int = DEFAULT_INPUT_SENTENCE_SIZE,
                    json_key: str = "text", hf_split: str = "train",
                    threads: int = DEFAULT_THREADS, max_docs: int | None = None,
                    max_bytes: int | None = None) -> TrainSummary:
    """Train on `inputs` (anything `resolve_inputs` accepts) and write `out/` atomically."""
    if model_type not in MODEL_TYPES:
        raise SiftError(f"--model-type '{model_type}' is not one of {', '.join(MODEL_TYPES)}")
    minimum = NUM_BYTE_PIECES + NUM_SPECIALS + 1
    if vocab_size < minimum:
        raise SiftError(f"--vocab-size {vocab_size} is too small; byte fallback needs at least {minimum}")
    if input_sentence_size < 0:
        raise SiftError(f"--input-sentence-size {input_sentence_size} must be >= 0 (0 = use all text)")
    if threads < 1:
        raise SiftError(f"--threads {threads} must be >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SiftError(f"--out '{out}' is a file; give a directory for the tokenizer")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise SiftError(f"--out '{out}' is a non-empty directory that is not a sift tokenizer; "
                        "choose a new path")
    from sift_megatron.preflight import check_writable_dir

    check_writable_dir(out.parent, "--out")  # the tokenizer is built beside `out`, then renamed: fail now
    sources = resolve_inputs(inputs)
    validate_sources(sources, json_key)

    import sentencepiece as spm

    stats = ReadStats()
    sentences = _Guarded(training_sentences(iter_documents(sources, json_key, stats, hf_split, max_docs=max_docs,
                                                           max_bytes=max_bytes)))
    feed: Iterator[str] = sentences
    if input_sentence_size > 0:
        feed = iter(sample_sentences(sentences, input_sentence_size, seed))
        if sentences.count == 0:
            raise SiftError(f"no text in inputs {describe_inputs(inputs)} (empty corpus)")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryFile("w+") as log, _stderr_to(log):
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=feed, model_writer=model,
                model_type=model_type, vocab_size=vocab_size, byte_fallback=True,
                character_coverage=CHARACTER_COVERAGE, normalization_rule_name="identity",
                add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                split_digits=True, max_sentence_length=4 * CHUNK_CHARS + 16,
                input_sentence_size=0, num_threads=threads,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            )
        except RuntimeError as e:
            if sentences.error is not None:
                raise sentences.error from None
            if sentences.count == 0:
                raise SiftError(f"no text in inputs {describe_inputs(inputs)} (empty corpus)") from None
            raise _user_error(str(e), vocab_size) from None

    sampled = min(sentences.count, input_sentence_size or sentences.count)
    summary = TrainSummary(out=str(out), model_type=model_type, vocab_size=vocab_size, seed=seed,
                           threads=threads, input_sentence_size=input_sentence_size,
                           sentences=sentences.count, sampled=sampled, documents=stats.documents,
                           bytes=stats.bytes, replaced_chars=stats.replaced_chars,
                           empty_skipped=stats.empty_skipped,
                           binary_skipped=stats.binary_skipped)
    meta = {"format": META_FORMAT, **asdict(summary), "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID,
            "eos_id": EOS_ID, "eod_id": EOD_ID, "byte_fallback": True, "normalization": "identity",
            "add_dummy_prefix": False, "remove_extra_whitespaces": False, "inputs": list(inputs)}
    meta.pop("out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temp_dir_for(out) as tmp:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        (tmp / VOCAB_FILE).write_text(_vocab_lines(model.getvalue()), encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        atomic.publish_dir(tmp, out)
    return summary
