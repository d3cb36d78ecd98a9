"""Export a `sift train` checkpoint as a Hugging Face transformers model directory.

* dense, Sparse Wide  -> GPT2LMHeadModel (GPT-2 is the GPT-3 architecture; Wide is only wider).
* Sparse Doped        -> GPT2LMHeadModel with W = W_s + V U folded into one dense matrix per linear.
* Sparse Parallel / Factorized -> SiftGPTForCausalLM (modeling_sift.py, copied beside the weights).

Layout facts the mapping relies on: megatron stores linears as [out, in] (GPT-2's Conv1D as [in, out]), and
its fused QKV rows are per-head interleaved ([q_j, k_j, v_j] for head j) where GPT-2 expects [Q | K | V]:
rows are permuted here (also the QKV outputs of the Sparse-IFT modules; their activations are elementwise,
so a row permutation commutes with them). The padded vocabulary rows are dropped: the export's vocabulary
is the tokenizer's. Output is written to a temp directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sift_megatron.convert.source import SLOTS, Source, load_source
from sift_megatron.errors import SiftError

STATS_FILE = "sparsity_stats.json"
GPT2_FAMILIES = ("dense", "wide", "doped")
SIFT_FAMILIES = ("parallel", "factorized")
HF_SLOT = {"linear_qkv": "attn.c_attn", "linear_proj": "attn.c_proj", "linear_fc1": "mlp.c_fc",
           "linear_fc2": "mlp.c_proj"}
SIFT_SLOT_KEY = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}
# ids must round-trip through the exported tokenizer exactly as through sentencepiece (checked on export)
TOKENIZER_PROBE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak.  \n"
                   "ROMEO: 1234 'tis 3.14159 -- what's \"this\"?\r\nCafé naïve 字 😀 ~~~\n\n\n")
# literal special/byte piece names: BPE never forms them from text (as sentencepiece); a converted unigram
# model's lattice can, so for unigram tokenizers such literals are a documented exception
TOKENIZER_PROBE_LITERALS = " </s> <s> <pad> <unk> <0x41>"


def qkv_rows(hidden: int, heads: int):
    """Index that reorders megatron's per-head [q_j, k_j, v_j] rows into GPT-2's [Q | K | V] rows."""
    import torch

    d = hidden // heads
    return torch.arange(3 * hidden).view(heads, 3, d).permute(1, 0, 2).reshape(-1)


def _folded(src: Source, p: str):
    """(W [out, in], b) of a dense/wide slot, or of a doped slot with W_s + V U summed in float64."""
    t = src.tensors
    if src.shape.family == "doped":
        w = t[f"{p}.sparse.weight"].double() + t[f"{p}.v.weight"].double() @ t[f"{p}.u.weight"].double()
        return w.float(), t[f"{p}.sparse.bias"]
    return t[f"{p}.weight"], t[f"{p}.bias"]


def _common_state(src: Source) -> dict:
    t, v = src.tensors, src.vocab_size
    sd = {"transformer.wte.weight": t["embedding.word_embeddings.weight"][:v],
          "transformer.wpe.weight": t["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": t["decoder.final_layernorm.weight"],
          "transformer.ln_f.bias": t["decoder.final_layernorm.bias"]}
    out = "output_layer.weight" if "output_layer.weight" in t else "embedding.word_embeddings.weight"
    sd["lm_head.weight"] = t[out][:v]
    for i in range(src.cfg.model.num_layers):
        for hf, mg in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            for leaf in ("weight", "bias"):
                sd[f"transformer.h.{i}.{hf}.{leaf}"] = t[f"decoder.layers.{i}.{mg}.{leaf}"]
    return sd


def gpt2_state(src: Source) -> dict:
    """GPT2LMHeadModel state dict (Conv1D weights are [in, out])."""
    perm = qkv_rows(src.shape.hidden_size, src.shape.num_attention_heads)
    sd = _common_state(src)
    for i in range(src.cfg.model.num_layers):
        for slot in SLOTS:
            w, b = _folded(src, src.layer(i, slot))
            if slot == "linear_qkv":
                w, b = w[perm], b[perm]
            sd[f"transformer.h.{i}.{HF_SLOT[slot]}.weight"] = w.t().contiguous()
            sd[f"transformer.h.{i}.{HF_SLOT[slot]}.bias"] = b.contiguous()
    return sd


def sift_state(src: Source) -> dict:
    """SiftGPTForCausalLM state dict (nn.Linear weights, [out, in])."""
    perm = qkv_rows(src.shape.hidden_size, src.shape.num_attention_heads)
    t, fam = src.tensors, src.shape.family
    sd = _common_state(src)
    for i in range(src.cfg.model.num_layers):
        for slot, (_, column) in SLOTS.items():
            p, q = src.layer(i, slot), f"transformer.h.{i}.{HF_SLOT[slot]}"
            rows = perm if slot == "linear_qkv" else slice(None)
            if fam == "parallel":
                for j in range(src.shape.branches):
                    sd[f"{q}.branches.{j}.weight"] = t[f"{p}.branches.{j}.weight"][rows].contiguous()
                    sd[f"{q}.branches.{j}.bias"] = t[f"{p}.branches.{j}.bias"][rows].contiguous()
            else:
                sd[f"{q}.u.weight"] = t[f"{p}.u.weight"]
                sd[f"{q}.norm.weight"] = t[f"{p}.norm.weight"]
                sd[f"{q}.norm.bias"] = t[f"{p}.norm.bias"]
                sd[f"{q}.v.weight"] = t[f"{p}.v.weight"][rows].contiguous()
                sd[f"{q}.v.bias"] = t[f"{p}.v.bias" if column else f"{p}.bias"][rows].contiguous()
    return sd


def _config_kwargs(src: Source, special: dict) -> dict:
    m, s = src.cfg.model, src.shape
    return dict(vocab_size=src.vocab_size, n_positions=src.max_positions, n_embd=s.hidden_size,
                n_layer=m.num_layers, n_head=s.num_attention_heads, n_inner=s.ffn_hidden_size,
                activation_function="gelu" if m.activation == "gelu" else "relu",  # exact erf GELU, as megatron
                resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout,
                layer_norm_epsilon=m.layernorm_epsilon, initializer_range=m.init_std,
                tie_word_embeddings=m.tie_embeddings, scale_attn_weights=True, dtype="float32",
                bos_token_id=special["eod"], eos_token_id=special["eod"], pad_token_id=special["pad"])


def build_model(src: Source, special: dict):
    """The transformers model with the checkpoint's weights (strict: every parameter mapped once)."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    fam = src.shape.family
    if fam in GPT2_FAMILIES:
        config, cls, sd = GPT2Config(**_config_kwargs(src, special)), GPT2LMHeadModel, gpt2_state(src)
    else:
        from sift_megatron.convert.modeling_sift import SiftGPTConfig, SiftGPTForCausalLM

        inner = {SIFT_SLOT_KEY[k]: int(v) for k, v in src.shape.inner.items()}
        config = SiftGPTConfig(family=fam, branches=int(src.shape.branches), inner=inner or None,
                               branch_activation=src.shape.branch_activation,
                               sparsity=float(src.shape.sparsity), **_config_kwargs(src, special))
        config.auto_map = {"AutoConfig": "modeling_sift.SiftGPTConfig",
                           "AutoModelForCausalLM": "modeling_sift.SiftGPTForCausalLM"}
        cls, sd = SiftGPTForCausalLM, sift_state(src)
    with torch.device("meta"):  # no random init of a model whose every weight is assigned below
        model = cls(config)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:  # a bug in this mapping, not a user error
        raise RuntimeError(f"HF mapping for {fam}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise RuntimeError(f"HF mapping for {fam}: {k} {tuple(v.shape)} != {tuple(own[k].shape)}")
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"HF mapping for {fam}: not loaded: {on_meta[:3]}")
    model.generation_config = GenerationConfig(bos_token_id=special["eod"], eos_token_id=special["eod"],
                                               pad_token_id=special["pad"])
    return model.eval()


# ------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(model_file: str | os.PathLike, max_length: int):
    """A transformers fast tokenizer that gives the sentencepiece model's ids (verified on a probe text).

    BOS and EOS are both our EOD (`</s>`), as GPT-2's `<|endoftext|>`: training separated documents by EOD
    and never saw `<s>`. `split_special_tokens` makes literal "</s>" in text encode as characters, as
    sentencepiece does. BPE models (the `sift data tokenizer` default) match sentencepiece on all text;
    unigram models on all text except literal piece names such as "</s>" or "<0x41>" (tokenizers' unigram
    lattice can match control and byte pieces, sentencepiece's cannot)."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    raw = Path(model_file).read_bytes()
    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise SiftError(f"tokenizer model '{model_file}' cannot be read ({type(e).__name__})") from None
    kind = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
    if kind == 2:
        vocab: dict | list = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif kind == 1:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        raise SiftError(f"tokenizer model '{model_file}': only BPE and unigram sentencepiece models convert")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    sp = spm.SentencePieceProcessor(model_proto=raw)
    piece = {i: sp.id_to_piece(i) for i in (sp.eos_id(), sp.unk_id(), sp.pad_id()) if i >= 0}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=piece[sp.eos_id()], eos_token=piece[sp.eos_id()],
        unk_token=piece.get(sp.unk_id()), pad_token=piece.get(sp.pad_id()), split_special_tokens=True,
        clean_up_tokenization_spaces=False)
    probe = TOKENIZER_PROBE + (TOKENIZER_PROBE_LITERALS if kind == 2 else "")
    want, got = sp.encode(probe), tok(probe, add_special_tokens=False)["input_ids"]
    if want != got:
        raise SiftError(f"tokenizer model '{model_file}': the converted transformers tokenizer does not "
                        "reproduce sentencepiece's ids; not exporting a mismatched tokenizer")
    tok.model_max_length = max_length  # after the probe, which is longer than a tiny model's context
    return tok, {"eod": sp.eos_id(), "pad": sp.pad_id() if sp.pad_id() >= 0 else None}


def build_hf_tokenizer(ref, max_length: int):
    """A transformers fast tokenizer around the Hugging Face tokenizer a run trained with, checked to give the
    training ids on a probe text. BOS and EOS are set to the EOD token, the only separator the model saw."""
    from transformers import PreTrainedTokenizerFast

    from data_prep.tokenizer import HFTokenizer

    ours = HFTokenizer(ref)
    tok = PreTrainedTokenizerFast(tokenizer_object=ours.backend, bos_token=ours.eod_piece,
                                  eos_token=ours.eod_piece, clean_up_tokenization_spaces=False)
    if tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] != ours.tokenize(TOKENIZER_PROBE):
        raise SiftError(f"tokenizer '{ref.spec}': the transformers tokenizer does not reproduce the training ids; "
                        "not exporting a mismatched tokenizer")
    tok.model_max_length = max_length
    return tok, {"eod": ours.eod, "pad": None}


def _tokenizer_ref(src: Source):
    """The tokenizer the run trained with (data.tokenizer or --tokenizer), None for mock data; a run on real data
    without one is an error: its EOD id and vocabulary are unknown."""
    cfg = src.cfg
    if cfg.data.mock:
        return None
    if not cfg.data.tokenizer:
        raise SiftError(f"{src.path / 'config.yaml'} names no data.tokenizer (a run on real data without one); "
                        "pass --tokenizer with the tokenizer its data was made with")
    from data_prep.hf_tokenizer import resolve

    try:
        return resolve(cfg.data.tokenizer)
    except SiftError as e:
        raise SiftError(f"{e} (named in {src.path / 'config.yaml'}; pass --tokenizer if it moved)") from None


# ------------------------------------------------------------------------------------------------ stats
def sparsity_stats(src: Source, architecture: str) -> dict:
    """Per sparse tensor: shape, mask nnz and density, and how many weights are actually non-zero."""
    t, s = src.tensors, src.shape
    rows, numel, nnz = [], 0, 0
    for name in sorted(k for k in t if k.endswith(".mask")):
        mask, weight = t[name], t[name[: -len("mask")] + "weight"]
        n, k = mask.numel(), int(mask.sum())
        parts = name.split(".")  # decoder.layers.<i>.<attention|mlp>.<slot>.<sub-module...>.mask
        rows.append({"name": name[: -len("mask")] + "weight", "layer": int(parts[2]), "slot": parts[4],
                     "shape": list(mask.shape), "numel": n, "nnz": k,
                     "density": k / n, "nonzero_weights": int((weight != 0).sum()),
                     "nonzero_outside_mask": int(((weight != 0) & (mask == 0)).sum())})
        numel, nnz = numel + n, nnz + k
    out = {"format": "sift-sparsity-stats-v1", "family": s.family, "s": s.nominal_sparsity,
           "sparsity": s.sparsity, "step": src.step, "source": str(src.path), "architecture": architecture,
           "hidden_size": s.hidden_size, "num_attention_heads": s.num_attention_heads,
           "ffn_hidden_size": s.ffn_hidden_size,
           "total": {"sparse_tensors": len(rows), "numel": numel, "nnz": nnz,
                     "density": nnz / numel if numel else 1.0},
           "tensors": rows}
    if s.family == "parallel":
        out["branches"] = s.branches
        out["branch_activation"] = {"fc1": "model", "qkv/proj/fc2": s.branch_activation}
    if s.family in ("factorized", "doped"):
        out["inner"] = dict(s.inner)
    if s.family == "doped":
        out["note"] = "W_s + V U folded into one dense matrix per linear: the exported weights are dense"
    elif s.family != "dense":
        out["note"] = "sparse weights are stored dense with exact zeros where the mask is off"
    return out


# ------------------------------------------------------------------------------------------------ export
def _check_out(out: Path) -> None:
    from sift_megatron.preflight import check_writable_dir

    check_writable_dir(out.parent, "--out")  # the export is built beside `out`, then renamed
    if out.exists() and not out.is_dir():
        raise SiftError(f"--out '{out}' is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STATS_FILE).is_file():
        raise SiftError(f"--out '{out}' is a non-empty directory that is not a sift export; choose a new path")


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None) -> Path:
    """Convert the checkpoint in `run_dir` into a transformers directory `out_dir` (replaced atomically)."""
    out = Path(out_dir)
    _check_out(out)
    from sift_megatron.extras import require

    require("sift convert", "transformers", "google.protobuf")
    src = load_source(run_dir, tokenizer)  # validates before the slow imports below
    tok_ref = _tokenizer_ref(src)
    import torch
    from transformers.utils import logging as hf_logging

    from data_prep import atomic

    if not torch.cuda.is_available():  # save_pretrained imports deepspeed, which warns when it finds no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()
    tok, special = (None, {"eod": 0, "pad": None})  # megatron's mock data: EOD = 0, no tokenizer
    if tok_ref is not None:
        build = build_tokenizer if tok_ref.kind == "sentencepiece" else build_hf_tokenizer
        tok, special = build(tok_ref.path if tok_ref.kind == "sentencepiece" else tok_ref, src.max_positions)
        if len(tok) > src.vocab_size:
            raise SiftError(f"tokenizer '{tok_ref.spec}' has {len(tok)} tokens but the checkpoint's vocabulary only "
                            f"{src.vocab_size}")
    model = build_model(src, special)
    arch = type(model).__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temp_dir_for(out) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if arch != "GPT2LMHeadModel":
            shutil.copyfile(Path(__file__).with_name("modeling_sift.py"), tmp / "modeling_sift.py")
        stats = sparsity_stats(src, arch)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # some writers create 0600 temp files; an export is meant to be shared
            f.chmod(0o666 & ~umask)
        atomic.publish_dir(tmp, out)
    return out
