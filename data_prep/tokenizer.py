"""The tokenizer adapters megatron's GPTDataset and our training use.

`load_tokenizer(spec)` reads a `sift data tokenizer` directory (sentencepiece) or a Hugging Face tokenizer
(a directory, a tokenizer.json, GPT-2 vocab.json + merges.txt, or a name in the local cache: see
`data_prep.hf_tokenizer`). GPTDataset needs only
`vocab_size` and `eod`; training also needs the vocabulary padded for tensor parallelism
(`padded_vocab_size`), and generation/export need `tokenize`/`detokenize`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # megatron.core warns at import that Transformer Engine/Apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from data_prep import hf_tokenizer
from sift_megatron.errors import SiftError, first_line
from sift_megatron.layout import padded_vocab_size  # noqa: F401 - re-exported: the trainer's one rule


class _DropLegacyWarning(logging.Filter):
    """MegatronLegacyTokenizer logs a deprecation warning on every construction; GPTDataset in 0.16.1
    still takes this interface, so the warning is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "legacy tokenizer system" not in record.getMessage()


logging.getLogger("megatron.core.datasets.megatron_tokenizer").addFilter(_DropLegacyWarning())


class _Tokenizer(MegatronLegacyTokenizer):
    """What both tokenizers share: the inverse vocabulary and EOD (= EOS) from `_eod`, set by the subclass."""

    _eod: int

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        return {i: p for p, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod


class SentencePieceTokenizer(_Tokenizer):
    """A sentencepiece model with the special ids megatron asks for (eod = `</s>`, pad = `<pad>`)."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        model_path = Path(model_path)
        super().__init__(str(model_path))
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self._eod = self._sp.eos_id()
        self._pad = self._sp.pad_id()
        if self._eod < 0:
            raise SiftError(f"tokenizer {model_path} has no end-of-document piece (</s>); "
                            "train it with `sift data tokenizer`")

    @property
    def processor(self):
        """The underlying `sentencepiece.SentencePieceProcessor` (for batch encoding)."""
        return self._sp

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without EOD (append `eod` yourself to end a document)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; control pieces (EOD, pad) decode to nothing."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._sp.decode(list(ids))

    @cached_property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        """Unpadded vocabulary size (see `padded_vocab_size` for the embedding size)."""
        return self._sp.get_piece_size()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._pad


class HFTokenizer(_Tokenizer):
    """A Hugging Face `tokenizers` tokenizer; documents are encoded without the tokenizer's own special tokens
    (no BOS), then end with `eod` (see `data_prep.hf_tokenizer.eod_token`)."""

    def __init__(self, ref: hf_tokenizer.TokenizerRef):
        super().__init__(str(ref.path))
        self.ref = ref
        self.backend = hf_tokenizer.load_backend(ref)
        self._eod, self.eod_piece = hf_tokenizer.eod_token(ref, self.backend)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without EOD."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens (EOD) decode to nothing, as with sentencepiece."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=True)

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Unpadded: the model vocabulary plus added tokens (ids are < vocab_size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | HFTokenizer:
    """Load what `path` names: ours, a sentencepiece model, or a Hugging Face tokenizer (never downloads)."""
    ref = hf_tokenizer.resolve(path)
    if ref.kind == "hf":
        return HFTokenizer(ref)
    try:
        return SentencePieceTokenizer(ref.path)
    except (RuntimeError, OSError) as e:
        raise SiftError(f"tokenizer model '{ref.path}' cannot be read ({first_line(e)})") from None
