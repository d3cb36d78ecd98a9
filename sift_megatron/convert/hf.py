"""Export a `sift train` checkpoint as a Hugging Face transformers model directory.

* dense, Sparse Wide  -> GPT2LMHeadModel (GPT-2 is the GPT-3 architecture; Wide is only wider).
* Sparse Doped        -> GPT2LMHeadModel with W = W_s + V U folded into one dense matrix per linear.
* Sparse Parallel / Factorized -> SiftGPTForCausalLM (modeling_sift.py, copied beside the weights).

Layout facts the mapping relies on: megatron stores linears as [out, in] (GPT-2's Conv1D as [in, out]), and
its fused QKV rows are per-head interleaved ([q_j, k_j, v_j] for head j) where GPT-2 expects [Q | K | V]:
rows are permuted here (also the QKV outputs of the Sparse-IFT modules; their activations are elementwise,
so a row permutation commutes with them). The padded vocabulary rows are dropped: the export's vocabulary
is the tokenizer's. Output is written to a temp directory and renamed into place.

The export streams: the checkpoint is read one logical tensor at a time (source.LazyTensors) and the
weights are written shard by shard as save_pretrained(max_shard_size=...) lays them out (one
model.safetensors, or shards + model.safetensors.index.json), so peak memory is about one shard plus the
largest tensor, never the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from functools import partial
from pathlib import Path

from sift_megatron.convert.source import SLOTS, Source, load_source
from sift_megatron.errors import SiftError

STATS_FILE = "sparsity_stats.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FOLD_BLOCK = 2**20  # elements per float64 block when folding a doped W_s + V U
MAX_SHARD_SIZE = "2GB"  # the export holds one shard at a time: this bounds its memory beyond one tensor
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


def _conv1d_weight(src: Source, p: str, qkv: bool):
    """GPT-2's Conv1D weight [in, out] of a slot: W^T with the QKV rows reordered, W = W_s + V U for doped
    (summed in float64, as W_s + V U is trained). Doped rows are read and folded a block at a time straight
    into the transposed output, so a fold holds one float32 W plus a block."""
    import torch

    t = src.tensors
    rows = qkv_rows(src.shape.hidden_size, src.shape.num_attention_heads) if qkv else None
    if src.shape.family != "doped":
        w = t[f"{p}.weight"].t()
        return (w if rows is None else w[:, rows]).contiguous()
    dout, din = t.shapes[f"{p}.sparse.weight"]
    u = t[f"{p}.u.weight"].double()
    out = torch.empty(din, dout)
    cols = torch.arange(dout) if rows is None else torch.argsort(rows)  # W row i -> column cols[i] of W[rows]^T
    step = max(1, FOLD_BLOCK // din)
    for r in range(0, dout, step):
        block = slice(r, min(r + step, dout))
        w = torch.addmm(t.read(f"{p}.sparse.weight", block).double(), t.read(f"{p}.v.weight", block).double(), u)
        out[:, cols[block]] = w.t().float()
    return out


def _common_state(src: Source) -> dict:
    t, v = src.tensors, src.vocab_size
    emb = "embedding.word_embeddings.weight"
    sd = {"transformer.wte.weight": lambda: t.read(emb, rows=v),  # the padded rows are never read
          "transformer.wpe.weight": lambda: t["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": lambda: t["decoder.final_layernorm.weight"],
          "transformer.ln_f.bias": lambda: t["decoder.final_layernorm.bias"]}
    if not src.cfg.model.tie_embeddings:  # tied: transformers stores (and reloads) only wte
        sd["lm_head.weight"] = lambda: t.read("output_layer.weight", rows=v)
    for i in range(src.cfg.model.num_layers):
        for hf, mg in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            for leaf in ("weight", "bias"):
                sd[f"transformer.h.{i}.{hf}.{leaf}"] = partial(t.read, f"decoder.layers.{i}.{mg}.{leaf}")
    return sd


def gpt2_state(src: Source) -> dict:
    """GPT2LMHeadModel state dict (Conv1D weights are [in, out]) as name -> zero-argument function that reads
    and maps that one tensor: nothing is read until it is called."""
    sd = _common_state(src)
    for i in range(src.cfg.model.num_layers):
        for slot in SLOTS:
            p, q, qkv = src.layer(i, slot), f"transformer.h.{i}.{HF_SLOT[slot]}", slot == "linear_qkv"
            bias = f"{p}.sparse.bias" if src.shape.family == "doped" else f"{p}.bias"
            sd[f"{q}.weight"] = partial(_conv1d_weight, src, p, qkv)
            sd[f"{q}.bias"] = partial(_rows, src, bias, qkv)
    return sd


def _rows(src: Source, name: str, qkv: bool):
    t = src.tensors[name]
    return t[qkv_rows(src.shape.hidden_size, src.shape.num_attention_heads)].contiguous() if qkv else t


def sift_state(src: Source) -> dict:
    """SiftGPTForCausalLM state dict (nn.Linear weights, [out, in]), lazy as gpt2_state."""
    t, fam = src.tensors, src.shape.family
    sd = _common_state(src)
    for i in range(src.cfg.model.num_layers):
        for slot, (_, column) in SLOTS.items():
            p, q, qkv = src.layer(i, slot), f"transformer.h.{i}.{HF_SLOT[slot]}", slot == "linear_qkv"
            if fam == "parallel":
                for j in range(src.shape.branches):
                    sd[f"{q}.branches.{j}.weight"] = partial(_rows, src, f"{p}.branches.{j}.weight", qkv)
                    sd[f"{q}.branches.{j}.bias"] = partial(_rows, src, f"{p}.branches.{j}.bias", qkv)
            else:
                sd[f"{q}.u.weight"] = partial(t.read, f"{p}.u.weight")
                sd[f"{q}.norm.weight"] = partial(t.read, f"{p}.norm.weight")
                sd[f"{q}.norm.bias"] = partial(t.read, f"{p}.norm.bias")
                sd[f"{q}.v.weight"] = partial(_rows, src, f"{p}.v.weight", qkv)
                sd[f"{q}.v.bias"] = partial(_rows, src, f"{p}.v.bias" if column else f"{p}.bias", qkv)
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


def hf_config(src: Source, special: dict):
    """(transformers config, generation config, model class, lazy state dict) of the export."""
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
    config.architectures = [cls.__name__]  # as save_pretrained sets it
    generation = GenerationConfig(bos_token_id=special["eod"], eos_token_id=special["eod"],
                                  pad_token_id=special["pad"])
    return config, generation, cls, sd


def _expected_state(config, cls) -> dict:
    """name -> shape of what from_pretrained loads: the model built on the meta device (no memory, no init),
    minus the tied lm_head."""
    import torch

    with torch.device("meta"):
        model = cls(config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (config.tie_word_embeddings and k == "lm_head.weight")}


def parse_size(size: int | str) -> int:
    """Bytes of a shard size given as an int or as transformers writes it ("2GB", "500MB", "1GiB")."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        n = 0
    if not isinstance(n, int) or n <= 0:
        raise SiftError(f"max shard size '{size}' is not a positive size (e.g. 2GB, 500MB or bytes)")
    return n


def write_weights(sd: dict, expected: dict, out: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> int:
    """Write the lazy state dict `sd` as transformers' save_pretrained does (model.safetensors, or shards
    model-0000i-of-0000n.safetensors + model.safetensors.index.json beyond `max_shard_size`), reading one
    tensor at a time: at most one shard of tensors is held at once. Returns the bytes written."""
    from safetensors.torch import save_file

    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:  # a bug in this mapping, not a user error
        raise RuntimeError(f"HF mapping: missing {missing[:3]}, unexpected {unexpected[:3]}")
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in expected.items():  # planned from the shapes (all float32) before anything is read
        n = 4 * math.prod(shape)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for keys, name in zip(shards, names):
        buf = {}
        for k in keys:
            v = sd[k]().contiguous()
            if tuple(v.shape) != expected[k]:
                raise RuntimeError(f"HF mapping: {k} {tuple(v.shape)} != {expected[k]}")
            buf[k] = v
            weight_map[k] = name
            total += v.numel() * v.element_size()
        save_file(buf, str(out / name), metadata={"format": "pt"})
        del buf
    if len(shards) > 1:
        params = sum(math.prod(s) for s in expected.values())
        index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


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
    import torch

    t, s = src.tensors, src.shape
    rows, numel, nnz = [], 0, 0
    for name in sorted(k for k in t if k.endswith(".mask")):
        mask, weight = t[name], t[name[: -len("mask")] + "weight"]
        # count_nonzero: no int64 copy of the tensor, as sum() over uint8/bool makes
        n, k = mask.numel(), int(torch.count_nonzero(mask))
        nonzero = weight != 0
        del weight
        nonzero_weights = int(torch.count_nonzero(nonzero))
        outside = int(torch.count_nonzero(nonzero.logical_and_(mask == 0)))
        parts = name.split(".")  # decoder.layers.<i>.<attention|mlp>.<slot>.<sub-module...>.mask
        rows.append({"name": name[: -len("mask")] + "weight", "layer": int(parts[2]), "slot": parts[4],
                     "shape": list(mask.shape), "numel": n, "nnz": k,
                     "density": k / n, "nonzero_weights": nonzero_weights, "nonzero_outside_mask": outside})
        del mask, nonzero
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


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
              max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Convert the checkpoint in `run_dir` into a transformers directory `out_dir` (replaced atomically),
    streaming: one logical tensor read at a time, weights written shard by shard."""
    out = Path(out_dir)
    _check_out(out)
    from sift_megatron.extras import require

    require("sift convert", "transformers", "google.protobuf")
    parse_size(max_shard_size)  # uses transformers' size parser: after the check that it is installed
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
    config, generation, cls, sd = hf_config(src, special)
    arch = cls.__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temp_dir_for(out) as tmp:
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        write_weights(sd, _expected_state(config, cls), tmp, max_shard_size)
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
