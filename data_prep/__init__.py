"""Data preparation: raw corpora -> sentencepiece (or a Hugging Face) tokenizer -> Megatron IndexedDataset files.

CLI: `sift data tokenizer ...` and `sift data preprocess ...` (see `data_prep.cli`). Python API:

* `data_prep.trainer.train_tokenizer(inputs, vocab_size, out_dir, ...)`
* `data_prep.preprocess.preprocess(inputs, tokenizer_dir, out_prefix, workers=..., shards=..., split=...)`
* `data_prep.tokenizer.load_tokenizer(spec)` / `padded_vocab_size(vocab, tp)` (for GPTDataset and training);
  `data_prep.hf_tokenizer.resolve(spec)`: which tokenizer a `--tokenizer` / `data.tokenizer` value names
* `data_prep.corpus.default_corpus_files(max_bytes)` (the built-in corpus: this Python's stdlib text)

This package imports only the standard library at top level; sentencepiece, megatron-core, pyarrow and
`datasets` are imported where they are used.
"""
