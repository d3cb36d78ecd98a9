"""Which tokenizer a `--tokenizer` / `data.tokenizer` value names, and Hugging Face tokenizers without transformers.

A value is resolved, in this order, to
* ours: a `sift data tokenizer` directory (tokenizer.model + sift_tokenizer.json) or a sentencepiece `.model` file;
* Hugging Face: a directory with tokenizer.json (what `save_pretrained` writes), a tokenizer.json file, or a
  directory with GPT-2 BPE files (vocab.json + merges.txt, or Megatron-LM's gpt2-vocab.json + gpt2-merges.txt:
  what `preprocess_data.py --tokenizer-type GPT2BPETokenizer` used);
* another sentencepiece model: a directory with only tokenizer.model (e.g. a slow Llama tokenizer);
* a model name in the local Hugging Face cache (`gpt2`, `hf:gpt2`, `org/name`), looked up with
  local_files_only: nothing is ever downloaded at run time (download it once with `hf download NAME`).

The EOD id (appended to every document, and the export's eos/bos) comes from the tokenizer: the `eos_token`
of tokenizer_config.json / special_tokens_map.json, else the first of EOD_CANDIDATES in its vocabulary.
Only the standard library is imported at top level (encode workers and `sift --help` stay light).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sift_megatron.errors import SiftError, first_line

SIFT_META = "sift_tokenizer.json"
SPM_MODEL = "tokenizer.model"
HF_FILE = "tokenizer.json"
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TokenizerRef:
    """A resolved tokenizer: `kind` 'sentencepiece' (path = the .model file) or 'hf' (path = a directory or a
    tokenizer.json file); `spec` is what the user wrote."""

    kind: str
    path: Path
    spec: str


def _bpe_files(d: Path) -> tuple[Path, Path] | None:
    """(vocab.json, merges.txt) of a GPT-2 BPE directory, also under Megatron-LM's `gpt2-` names."""
    for vocab, merges in (("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt")):
        if (d / vocab).is_file() and (d / merges).is_file():
            return d / vocab, d / merges
    return None


def _in_directory(d: Path, spec: str) -> TokenizerRef:
    if (d / SIFT_META).is_file() and (d / SPM_MODEL).is_file():
        return TokenizerRef("sentencepiece", d / SPM_MODEL, spec)
    if (d / HF_FILE).is_file() or _bpe_files(d):
        return TokenizerRef("hf", d, spec)
    if (d / SPM_MODEL).is_file():
        return TokenizerRef("sentencepiece", d / SPM_MODEL, spec)
    raise SiftError(f"tokenizer directory '{spec}' has no {SPM_MODEL}, {HF_FILE} or vocab.json + merges.txt; "
                    "create one with `sift data tokenizer` or give a Hugging Face tokenizer directory")


def _from_hub_cache(name: str, spec: str) -> Path:
    """The local snapshot of a hub model (HF_HOME / HF_HUB_CACHE); never downloads."""
    if not _HUB_NAME.match(name):
        raise SiftError(f"tokenizer '{spec}' not found; create one with `sift data tokenizer` or give a Hugging "
                        "Face tokenizer directory")
    hint = (f"tokenizer '{spec}' not found: not a file or directory, nor a model in the local Hugging Face cache "
            f"(nothing is downloaded at run time; download it first, e.g. `hf download {name}`, or give a directory)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except ImportError:
        raise SiftError(f"tokenizer '{spec}': huggingface_hub is not installed, so the Hugging Face cache cannot "
                        "be searched; give a directory") from None
    except Exception:  # LocalEntryNotFoundError, an invalid repo id...: all mean "not in the cache"
        raise SiftError(hint) from None


def resolve(spec: str | Path) -> TokenizerRef:
    """What `spec` names (see the module docstring); a one-line SiftError when nothing matches."""
    text = str(spec)
    path = Path(text).expanduser()
    if not text.startswith("hf:") and path.exists():
        if path.is_dir():
            return _in_directory(path, text)
        return TokenizerRef("hf" if path.suffix == ".json" else "sentencepiece", path, text)
    name = text[3:] if text.startswith("hf:") else text
    snapshot = _from_hub_cache(name, text)
    ref = _in_directory(snapshot, text)
    return TokenizerRef(ref.kind, ref.path, text)


def _gpt2_bpe(vocab: Path, merges: Path):
    """GPT-2's byte-level BPE from vocab.json + merges.txt, built as transformers' GPT2Converter does (the
    tokenization of Megatron-LM's GPT2BPETokenizer); <|endoftext|> is a special token when in the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="",
                                  fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


def load_backend(ref: TokenizerRef):
    """The `tokenizers.Tokenizer` of an 'hf' reference (one-line errors for unreadable files)."""
    from tokenizers import Tokenizer

    path = ref.path
    file = path / HF_FILE if path.is_dir() else path
    try:
        if file.is_file():
            return Tokenizer.from_file(str(file))
        return _gpt2_bpe(*_bpe_files(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for malformed JSON / files
        raise SiftError(f"tokenizer '{ref.spec}' cannot be read ({first_line(e)})") from None


def _configured_eos(path: Path) -> str | None:
    """eos_token from tokenizer_config.json or special_tokens_map.json beside the tokenizer, if any."""
    d = path if path.is_dir() else path.parent
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if not f.is_file():
            continue
        try:
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            raise SiftError(f"tokenizer '{f}' is not a JSON object") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def eod_token(ref: TokenizerRef, backend) -> tuple[int, str]:
    """(id, text) of the end-of-document token."""
    eos = _configured_eos(ref.path)
    candidates = (eos,) if eos is not None else EOD_CANDIDATES
    for piece in candidates:
        i = backend.token_to_id(piece)
        if i is not None:
            return i, piece
    if eos is not None:
        raise SiftError(f"tokenizer '{ref.spec}': its eos_token {eos!r} is not in its vocabulary")
    raise SiftError(f"tokenizer '{ref.spec}' has no end-of-document token: set eos_token in its "
                    f"tokenizer_config.json or add one of {', '.join(EOD_CANDIDATES)}")


def vocab_size(spec: str | Path) -> int:
    """Unpadded vocabulary size of any tokenizer `resolve` accepts, without importing megatron (preflight)."""
    ref = resolve(spec)
    if ref.kind == "hf":
        return load_backend(ref).get_vocab_size(with_added_tokens=True)
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(ref.path)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise SiftError(f"tokenizer model '{ref.path}' cannot be read ({first_line(e)})") from None
