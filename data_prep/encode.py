"""Worker side of `preprocess`: one chunk of documents -> one flat token array plus per-document lengths.

Kept free of torch/megatron imports so workers start fast even where they are spawned. Per chunk the
work is one batched sentencepiece call returning numpy buffers and one concatenate: no per-token Python.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

_STATE: dict = {}


def init_worker(model_proto: bytes, dtype: str) -> None:
    """Pool initializer (also called in-process when there is a single worker)."""
    import signal

    import sentencepiece as spm

    # Ctrl-C reaches the whole process group; the parent handles it (and terminates the pool), so workers
    # ignore it instead of each printing a traceback.
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    _STATE["sp"] = sp
    _STATE["dtype"] = np.dtype(dtype)
    _STATE["eod"] = np.array([sp.eos_id()], dtype=np.int32)


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents and append EOD to each; return (tokens in the output dtype, lengths incl. EOD)."""
    sp, dtype, eod = _STATE["sp"], _STATE["dtype"], _STATE["eod"]
    arrays = sp.encode(texts, out_type="numpy", num_threads=1)
    parts: list[np.ndarray] = []
    for a in arrays:
        parts.append(a)
        parts.append(eod)
    lengths = np.fromiter((a.size + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    tokens = np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.empty(0, dtype)
    return tokens, lengths
