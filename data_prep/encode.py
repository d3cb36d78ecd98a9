"""Worker side of `preprocess`: one chunk of documents -> one flat token array plus per-document lengths.

Kept free of torch/megatron imports so workers start fast even where they are spawned. Per chunk the
work is one batched tokenizer call (sentencepiece returns numpy buffers; Hugging Face `tokenizers` runs in
Rust) and one concatenate.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np

_STATE: dict = {}


def init_worker(spec: tuple, dtype: str) -> None:
    """Pool initializer (also called in-process when there is a single worker). `spec` is
    ("sentencepiece", model proto bytes) or ("hf", tokenizer JSON text, EOD id): picklable, so the
    tokenizer travels to spawned workers too."""
    import signal

    # Ctrl-C reaches the whole process group; the parent handles it (and terminates the pool), so workers
    # ignore it instead of each printing a traceback.
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --workers processes, not workers x Rust threads
    if spec[0] == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=spec[1])
        _STATE["encode"] = lambda texts: sp.encode(texts, out_type="numpy", num_threads=1)
        eod = sp.eos_id()
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(spec[1])
        _STATE["encode"] = lambda texts: [np.asarray(e.ids, dtype=np.int32)
                                          for e in tok.encode_batch(texts, add_special_tokens=False)]
        eod = spec[2]
    _STATE["dtype"] = np.dtype(dtype)
    _STATE["eod"] = np.array([eod], dtype=np.int32)


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents and append EOD to each; return (tokens in the output dtype, lengths incl. EOD)."""
    dtype, eod = _STATE["dtype"], _STATE["eod"]
    arrays = _STATE["encode"](texts)
    parts: list[np.ndarray] = []
    for a in arrays:
        parts.append(a)
        parts.append(eod)
    lengths = np.fromiter((a.size + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    tokens = np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.empty(0, dtype)
    return tokens, lengths
