"""Input corpora: resolve `--input` values to sources and stream documents out of them.

One document per text file, per jsonl line, per parquet row, per `datasets` record. Text is decoded as
UTF-8; bytes that are not valid UTF-8 become U+FFFD and are counted (a corpus with a few bad bytes should
still train, but the user should hear about it). Everything here runs in the main process and imports
only the standard library until a parquet or `datasets` source is actually read.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sift_megatron.errors import SiftError, first_line

DEFAULT_INPUT = "default"
HF_PREFIX = "hf:"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")  # gzip; Zstandard (the Pile's .jsonl.zst), with the `data` extra
PARQUET_SUFFIXES = (".parquet", ".pq")
# Files that mark a directory written by `datasets.Dataset.save_to_disk`.
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()

# Default corpus: the standard library's own text. Tests, vendored wheels, compiled modules and codec
# tables are skipped: they are either not text or not representative of prose/code.
_DEFAULT_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                                "lib-dynload", "ensurepip", "encodings", "lib2to3"})
_DEFAULT_SUFFIXES = frozenset({".py", ".txt", ".rst", ".md"})
_BINARY_SNIFF = 8192


@dataclass(frozen=True)
class Source:
    """One input to read: `kind` is text, jsonl, parquet, hf_disk or hf_hub."""

    kind: str
    path: str
    # Text files found by walking a directory: binary ones are skipped instead of being decoded as garbage.
    sniff_binary: bool = False


@dataclass
class ReadStats:
    """Counts gathered while streaming documents (reported in the summaries)."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text
    input_bytes: int = 0  # bytes read from input files (progress); text bytes for parquet/datasets
    replaced_chars: int = 0
    empty_skipped: int = 0
    binary_skipped: int = 0
    sources: int = 0
    skipped_files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- default
def default_corpus_root() -> Path:
    """The standard library directory of the running interpreter (exists wherever Python does)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _doc_dirs() -> list[Path]:
    """Python's documentation sources, when the distribution ships them (most don't)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys.base_prefix) / "share" / "doc" / version, Path(sys.base_prefix) / "Doc"]
    return [p for p in candidates if p.is_dir()]


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(_BINARY_SNIFF)


def _walk_sorted(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[Path]:
    """All regular files under root in a deterministic (sorted) order, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skip_dirs and not d.startswith(".") and not d.startswith("config-"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                yield path


def default_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """Text files of the built-in corpus (stdlib sources, plus docs if installed), in sorted order.

    With `max_bytes`, files are taken in that order and those that would overflow the budget are
    skipped, so a small, deterministic subset (e.g. 4-8 MB for the quickstart) is cheap to get.
    """
    roots = [(default_corpus_root(), _DEFAULT_SKIP_DIRS)] + [(d, frozenset()) for d in _doc_dirs()]
    files: list[Path] = []
    total = 0
    for root, skip in roots:
        for path in _walk_sorted(root, skip):
            if path.suffix not in _DEFAULT_SUFFIXES:
                continue
            size = path.stat().st_size
            if size == 0 or (max_bytes is not None and total + size > max_bytes) or _looks_binary(path):
                continue
            files.append(path)
            total += size
    if not files:
        raise SiftError(f"the default corpus is empty (no text files under {default_corpus_root()}"
                        + (f" within {max_bytes} bytes" if max_bytes is not None else "") + ")")
    return files


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)i?b?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8MB' / '512k' / '1000' -> bytes (powers of 1000, as `ls -h --si` and download sizes use)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise SiftError(f"size '{text}' is not a number of bytes such as 8MB, 512KB or 1000000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# --------------------------------------------------------------------------------------------- resolve
def _file_source(path: Path, sniff_binary: bool = False) -> Source:
    name = path.name.lower()
    for ext in COMPRESSED_SUFFIXES:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(JSONL_SUFFIXES):
        return Source("jsonl", str(path))
    if name.endswith(PARQUET_SUFFIXES):
        return Source("parquet", str(path))
    return Source("text", str(path), sniff_binary=sniff_binary)


def _path_sources(path: Path) -> list[Source]:
    if path.is_file():
        return [_file_source(path)]
    if any((path / m).is_file() for m in _HF_DISK_MARKERS):
        return [Source("hf_disk", str(path))]
    return [_file_source(p, sniff_binary=True) for p in _walk_sorted(path)]


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Turn `--input` values into sources, failing fast (before any heavy work) on anything missing.

    Accepted: a file (text; .jsonl/.json/.ndjson; .parquet; text and jsonl optionally .gz or .zst), a directory (walked
    recursively in sorted order, or a `datasets.save_to_disk` directory), a glob, `default` or
    `default:SIZE` (the built-in corpus, optionally capped), or `hf:NAME[:CONFIG]` (`datasets.load_dataset`).
    """
    if not inputs:
        raise SiftError("no --input given; pass files, directories, globs, 'default' or hf:NAME")
    sources: list[Source] = []
    for spec in inputs:
        if spec == DEFAULT_INPUT or spec.startswith(DEFAULT_INPUT + ":"):
            cap = parse_size(spec.split(":", 1)[1]) if ":" in spec else None
            sources += [Source("text", str(p)) for p in default_corpus_files(cap)]
            continue
        if spec.startswith(HF_PREFIX):
            if not spec[len(HF_PREFIX):]:
                raise SiftError(f"input '{spec}' names no dataset; use hf:NAME or hf:NAME:CONFIG")
            sources.append(Source("hf_hub", spec[len(HF_PREFIX):]))
            continue
        path = Path(spec).expanduser()
        if path.exists():
            found = _path_sources(path)
            if not found:
                raise SiftError(f"input directory '{spec}' contains no files")
            sources += found
        elif _GLOB_CHARS.search(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise SiftError(f"input glob '{spec}' matched no files")
            for m in matches:
                sources += _path_sources(Path(m))
        else:
            raise SiftError(f"input '{spec}' not found (expected a file, directory, glob, "
                            f"'{DEFAULT_INPUT}' or hf:NAME)")
    return sources


def known_size(sources: list[Source]) -> int | None:
    """Total bytes on disk when every source is an uncompressed text/jsonl file (progress bar total)."""
    if any(s.kind not in ("text", "jsonl") or s.path.endswith(COMPRESSED_SUFFIXES) for s in sources):
        return None
    return sum(os.path.getsize(s.path) for s in sources)


# --------------------------------------------------------------------------------------------- validate
def validate_sources(sources: list[Source], json_key: str) -> None:
    """Cheap up-front checks (parquet footer and column, first jsonl record, datasets column) so that
    the common mistakes fail in a fraction of a second, before tokenizers load or temp files appear."""
    for src in sources:
        if src.kind == "parquet":
            names = _parquet_file(src.path).schema_arrow.names
            if json_key not in names:
                raise SiftError(f"parquet file {src.path} has no column '{json_key}' (columns: "
                                f"{', '.join(names)}); choose one with --json-key")
        elif src.kind == "jsonl":
            for _ in _iter_jsonl(src, json_key, ReadStats(), limit=1):
                pass


# --------------------------------------------------------------------------------------------- decode
def decode_utf8(raw: bytes, stats: ReadStats) -> str:
    """Decode, replacing invalid bytes with U+FFFD; count only the replacements we made."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
        return text


def clean_str(text: str, stats: ReadStats) -> tuple[str, int]:
    """Replace lone surrogates (legal in JSON escapes and Python str, not in UTF-8); return (text, bytes)."""
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text, n = _SURROGATES.subn(_REPLACEMENT, text)
        stats.replaced_chars += n
        return text, len(text.encode("utf-8"))


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        from sift_megatron.extras import require

        require(f"reading {path}", "zstandard")
        import zstandard

        # streamed (multi-frame files as the Pile's included): memory stays flat whatever the file size
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


# --------------------------------------------------------------------------------------------- readers
def _iter_text(src: Source, stats: ReadStats) -> Iterator[str]:
    with _open_binary(src.path) as f:
        raw = f.read()
    stats.input_bytes += len(raw)
    if src.sniff_binary and b"\x00" in raw[:_BINARY_SNIFF]:
        stats.binary_skipped += 1
        stats.skipped_files.append(src.path)
        return
    text = decode_utf8(raw, stats)
    stats.bytes += len(raw)
    yield text


def _iter_jsonl(src: Source, json_key: str, stats: ReadStats, limit: int | None = None) -> Iterator[str]:
    seen = 0
    with _open_binary(src.path) as f:
        for lineno, raw in enumerate(f, 1):
            stats.input_bytes += len(raw)
            if not raw.strip():
                continue
            line = decode_utf8(raw, stats)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SiftError(f"{src.path}:{lineno}: not valid JSON ({e.msg}); jsonl needs one JSON "
                                "object per line") from None
            if not isinstance(record, dict):
                raise SiftError(f"{src.path}:{lineno}: expected a JSON object with key '{json_key}', "
                                f"got {type(record).__name__}")
            if json_key not in record:
                keys = ", ".join(map(str, list(record)[:10])) or "none"
                raise SiftError(f"{src.path}:{lineno}: json key '{json_key}' not found (keys: {keys}); "
                                "choose one with --json-key")
            text = record[json_key]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise SiftError(f"{src.path}:{lineno}: json key '{json_key}' holds {type(text).__name__}, "
                                "expected a string")
            text, nbytes = clean_str(text, stats)
            stats.bytes += nbytes
            yield text
            seen += 1
            if limit is not None and seen >= limit:
                return


def _parquet_file(path: str):
    from sift_megatron.extras import require

    require("reading parquet", "pyarrow")
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise SiftError(f"{path} is not a valid parquet file ({first_line(e)})") from None


def _column_texts(values: list, where: str, json_key: str, stats: ReadStats) -> Iterator[str]:
    for value in values:
        if value is None:
            value = ""
        elif isinstance(value, bytes):
            value = decode_utf8(value, stats)
        elif not isinstance(value, str):
            raise SiftError(f"{where}: column '{json_key}' holds {type(value).__name__}, expected text")
        value, nbytes = clean_str(value, stats)
        stats.bytes += nbytes
        stats.input_bytes += nbytes
        yield value


def _iter_parquet(src: Source, json_key: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow

    pf = _parquet_file(src.path)
    if json_key not in pf.schema_arrow.names:
        raise SiftError(f"parquet file {src.path} has no column '{json_key}' (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); choose one with --json-key")
    try:
        for batch in pf.iter_batches(columns=[json_key], batch_size=1024):
            yield from _column_texts(batch.column(0).to_pylist(), src.path, json_key, stats)
    except pyarrow.ArrowException as e:
        raise SiftError(f"{src.path} is not a valid parquet file ({first_line(e)})") from None


def _hf_dataset(src: Source, split: str):
    from sift_megatron.extras import require

    require("reading a datasets dataset", "datasets")
    import datasets

    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.path)
        else:
            # streamed: documents arrive as they download (or are read), nothing is materialised first
            name, _, config = src.path.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; the user needs the first line only
        reason = first_line(e)
        raise SiftError(f"cannot load datasets dataset '{src.path}' ({reason})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SiftError(f"datasets dataset '{src.path}' has no split '{split}' (splits: "
                            f"{', '.join(ds)}); choose one with --hf-split")
        ds = ds[split]
    return ds


def _iter_hf(src: Source, json_key: str, split: str, stats: ReadStats) -> Iterator[str]:
    ds = _hf_dataset(src, split)
    columns = ds.column_names
    if columns is None:  # a stream whose features are unknown until the first record
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [json_key]
    if json_key not in columns:
        raise SiftError(f"datasets dataset '{src.path}' has no column '{json_key}' (columns: "
                        f"{', '.join(columns)}); choose one with --json-key")
    ds = ds.select_columns([json_key])
    for batch in ds.iter(batch_size=1024):
        yield from _column_texts(batch[json_key], src.path, json_key, stats)


def iter_documents(sources: list[Source], json_key: str = "text", stats: ReadStats | None = None,
                   hf_split: str = "train", max_docs: int | None = None,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Yield non-empty documents in input order; `stats` (if given) is updated as they stream. `max_docs` /
    `max_bytes` take a prefix: stop after that many documents, or once the documents hold that many UTF-8
    bytes (the last one may cross the limit); the rest of the input is never read."""
    stats = stats if stats is not None else ReadStats()
    for text in _all_documents(sources, json_key, stats, hf_split):
        yield text
        if (max_docs is not None and stats.documents >= max_docs) or (
                max_bytes is not None and stats.bytes >= max_bytes):
            return


def _all_documents(sources: list[Source], json_key: str, stats: ReadStats, hf_split: str) -> Iterator[str]:
    for src in sources:
        stats.sources += 1
        if src.kind == "text":
            docs = _iter_text(src, stats)
        elif src.kind == "jsonl":
            docs = _iter_jsonl(src, json_key, stats)
        elif src.kind == "parquet":
            docs = _iter_parquet(src, json_key, stats)
        elif src.kind in ("hf_disk", "hf_hub"):
            docs = _iter_hf(src, json_key, hf_split, stats)
        else:  # pragma: no cover - resolve_inputs only makes the kinds above
            raise ValueError(f"unknown source kind {src.kind}")
        for text in docs:
            if not text:
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield text


def describe_inputs(inputs: list[str]) -> str:
    """Short form of the inputs for error messages."""
    shown = ", ".join(inputs[:3])
    return shown + (f" (+{len(inputs) - 3} more)" if len(inputs) > 3 else "")
