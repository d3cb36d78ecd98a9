"""`sift data tokenizer` and `sift data preprocess`. Heavy imports (sentencepiece, megatron) happen in the
handlers so `sift --help` stays instant."""

from __future__ import annotations

import argparse

from sift_megatron.errors import deferred_sigint, positive_int

INPUT_HELP = ("text files, directories (walked in sorted order), globs, .jsonl/.json/.ndjson, .parquet "
              "(text and jsonl may be .gz or .zst), a datasets.save_to_disk directory, hf:NAME[:CONFIG] "
              "(datasets.load_dataset), or 'default' / 'default:8MB' for the built-in corpus (this Python's "
              "standard library source)")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=INPUT_HELP)
    p.add_argument("--json-key", default="text",
                   help="field/column holding the text (jsonl, parquet, datasets)")
    p.add_argument("--hf-split", default="train",
                   help="split to read from a datasets dataset (default: train); hf:NAME is streamed")
    p.add_argument("--max-docs", type=positive_int, metavar="N", help="take only the first N documents")
    p.add_argument("--max-bytes", type=_size, metavar="SIZE",
                   help="take only the first documents up to SIZE bytes of text (e.g. 500MB; the last document "
                        "may cross it)")


def _size(text: str) -> int:
    from data_prep.corpus import parse_size
    from sift_megatron.errors import SiftError

    try:
        n = parse_size(text)
    except SiftError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size '{text}' must be at least 1 byte")
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` with its `tokenizer` and `preprocess` sub-commands to the `sift` parser."""
    data = subparsers.add_parser("data", help="train tokenizers; tokenize corpora into Megatron .bin/.idx",
                                 description="Data preparation: sentencepiece tokenizers and Megatron "
                                             "IndexedDataset files.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    from data_prep.trainer import DEFAULT_INPUT_SENTENCE_SIZE, DEFAULT_THREADS, MODEL_TYPES

    t = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer",
                       description="Train a sentencepiece tokenizer (byte fallback, exact round trip, "
                                   "<pad>=0 <unk>=1 <s>=2 </s>=3=EOD); writes DIR atomically.")
    _add_input_args(t)
    t.add_argument("--vocab-size", type=positive_int, required=True, metavar="N")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (created or replaced)")
    t.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    t.add_argument("--seed", type=int, default=0, help="sampling seed; same seed+inputs+threads = same model")
    t.add_argument("--input-sentence-size", type=int, default=DEFAULT_INPUT_SENTENCE_SIZE, metavar="N",
                   help="sample at most N text chunks (<= 2048 chars each) for training; 0 = use all "
                        f"(default {DEFAULT_INPUT_SENTENCE_SIZE})")
    t.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                   help="sentencepiece trainer threads; part of the result, not only speed "
                        f"(default {DEFAULT_THREADS})")
    t.set_defaults(func=_tokenizer)

    p = sub.add_parser("preprocess", help="tokenize a corpus into Megatron IndexedDataset files",
                       description="Tokenize documents (EOD appended to each) into PREFIX.bin/.idx, "
                                   "optionally split into PREFIX_{train,valid,test} and K shards each.")
    _add_input_args(p)
    p.add_argument("--tokenizer", required=True, metavar="DIR|NAME",
                   help="a `sift data tokenizer` directory, a Hugging Face tokenizer (a directory with "
                        "tokenizer.json, a tokenizer.json file, GPT-2 vocab.json + merges.txt as Megatron-LM "
                        "uses) or a model name in the local Hugging Face cache (never downloaded)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix in an existing directory")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N", help="tokenizer processes")
    p.add_argument("--shards", type=positive_int, default=1, metavar="K", help="output shards per split")
    p.add_argument("--split", default=None, metavar="W,W,W",
                   help="document split weights for train,valid,test, e.g. 98,1,1; documents are dealt out "
                        "in stream order so every split samples the whole corpus (default: one output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when not a TTY)")
    p.set_defaults(func=_preprocess)


def _tokenizer(args: argparse.Namespace) -> int:
    with deferred_sigint():  # C extensions import: a Ctrl-C is raised after, where cleanups run
        from data_prep.trainer import train_tokenizer

    s = train_tokenizer(args.input, args.vocab_size, args.out, model_type=args.model_type, seed=args.seed,
                        input_sentence_size=args.input_sentence_size, json_key=args.json_key,
                        hf_split=args.hf_split, threads=args.threads, max_docs=args.max_docs,
                        max_bytes=args.max_bytes)
    print(f"tokenizer: {s.out} ({s.model_type}, vocab {s.vocab_size}, seed {s.seed}) from {s.documents:,} "
          f"documents, {s.bytes:,} bytes ({s.sampled:,} of {s.sentences:,} chunks used); "
          f"{s.replaced_chars:,} replaced characters, {s.empty_skipped:,} empty documents and "
          f"{s.binary_skipped:,} binary files skipped")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    with deferred_sigint():
        from data_prep.preprocess import preprocess

    s = preprocess(args.input, args.tokenizer, args.out, workers=args.workers, shards=args.shards,
                   json_key=args.json_key, split=args.split, hf_split=args.hf_split,
                   progress=not args.no_progress, max_docs=args.max_docs, max_bytes=args.max_bytes)
    print(f"preprocess: {s.documents:,} documents, {s.tokens:,} tokens ({s.dtype}, EOD id {s.eod} included), "
          f"{s.bytes:,} bytes, {s.replaced_chars:,} replaced characters, {s.empty_skipped:,} empty documents "
          f"and {s.binary_skipped:,} binary files skipped; {s.seconds:.1f} s, "
          f"{s.tokens_per_second:,.0f} tokens/s with {s.workers} worker(s)")
    for o in s.outputs:
        print(f"  {o.prefix}.{{bin,idx}}: {o.documents:,} documents, {o.tokens:,} tokens")
    return 0
