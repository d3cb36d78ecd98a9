"""Run configuration: YAML -> validated dataclasses, `a.b=c` overrides, one-line errors.

A config file may start from another with `include: other.yaml` (path relative to the including file);
keys given later win. Every key is checked against the dataclasses below, so a typo is an error that
names the key and the allowed ones, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sift_megatron.errors import SiftError, fault_point, first_line


@dataclass
class ModelConfig:
    """GPT-3 architecture: learned absolute positions, GELU, LayerNorm, biases, tied embeddings."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    """None: 4 x hidden_size."""
    seq_length: int = 64
    max_position_embeddings: int | None = None
    """None: seq_length."""
    vocab_size: int | None = None
    """None: from the tokenizer (data.tokenizer) or data.mock_vocab_size."""
    make_vocab_size_divisible_by: int = 128
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    activation: Literal["gelu", "relu"] = "gelu"
    """The MLP's non-linearity (GPT-3: gelu)."""
    layout_invariant_init: bool = True
    """Initialise every weight from a generator keyed by (seed, global parameter name) so that any TP/PP layout
    starts from the same logical model. Costs one full-tensor draw per parameter."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (Megatron-LM --recompute-granularity): selective re-runs core attention in backward
    (drops the s^2 score tensors); full keeps only the input of every recompute_num_layers-th layer and re-runs
    those layers in backward (method uniform). Needed to fit the 175B Sparse Wide layouts."""
    recompute_num_layers: int = 1
    """Full recompute only: layers per recomputed chunk (--recompute-num-layers)."""
    precision: Literal["fp32", "bf16", "fp64"] = "fp32"
    """bf16: bf16 module, fp32 master weights + Adam state and fp32 gradient accumulation in DeepSpeed's
    optimizer (the usual GPU setting); fp64: everything float64, for exactness tests and debugging layouts,
    where fp32 rounding differences between TP degrees would hide real bugs."""
    attention: Literal["auto", "sdpa", "unfused", "te"] = "sdpa"
    """Core attention: sdpa (torch scaled_dot_product_attention: flash / cuDNN / memory-efficient kernels on
    GPUs, causal without a materialised mask), unfused (megatron's local DotProductAttention), te (Transformer
    Engine's, needs transformer_engine), auto (te where it imports on a GPU, else sdpa)."""

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B)."""
    sequence_parallel: bool = False


@dataclass
class ZeroConfig:
    """DeepSpeed owns optimizer state. `extra` is merged into the generated DeepSpeed JSON config."""

    stage: int = 1
    stage0_when_single_replica: bool = True
    """With one data-parallel replica ZeRO partitions nothing but still copies every parameter and gradient
    through flat fp32 buffers (+22 % step time on the tiny model): run stage 0 then (PP=1 only; the pipeline
    path needs stage 1). Set false to force the configured stage."""
    config_file: str | None = None
    """A DeepSpeed JSON/YAML file (e.g. configs/deepspeed/zero2.yaml)."""
    extra: dict = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Not applied to biases and norm parameters."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""


@dataclass
class LRScheduleConfig:
    """Warm-up and decay in steps, or in tokens / samples (Megatron-LM's --lr-warmup-samples /
    --lr-decay-samples); set at most one unit of each. *_tokens / *_samples are exact at any batch size: the LR
    follows the samples consumed; warmup_steps / decay_steps are then derived (rounded) for display."""

    warmup_steps: int = 0
    decay_steps: int | None = None
    """Length after the warm-up; None: train.steps - warmup_steps."""
    style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to min_lr."""
    warmup_tokens: int | None = None
    warmup_samples: int | None = None
    decay_tokens: int | None = None
    """decay_tokens / decay_samples: where the decay ENDS, counted from the start (warm-up included), as
    Megatron-LM's --lr-decay-samples and the GPT-3 paper's "decay over 260B tokens"; None: the end of training."""
    decay_samples: int | None = None


@dataclass
class DataConfig:
    prefixes: list = field(default_factory=list)
    """Megatron .bin/.idx prefixes; a blend is written as [weight1, prefix1, weight2, prefix2, ...]."""
    split: str = "98,1,1"
    """Documents of `prefixes` for train,valid,test (ignored with valid_prefixes)."""
    valid_prefixes: list = field(default_factory=list)
    """Separate validation prefixes (e.g. <out>_valid)."""
    tokenizer: str | None = None
    """The tokenizer the data was made with (vocabulary, EOD id, exported with the model): a `sift data tokenizer`
    directory, a Hugging Face tokenizer (directory, tokenizer.json, GPT-2 vocab.json + merges.txt) or a model
    name in the local Hugging Face cache (never downloaded); see data_prep/hf_tokenizer.py."""
    mock: bool = False
    """Megatron's MockGPTDataset (tests, benchmarks)."""
    mock_vocab_size: int = 256
    cache_dir: str | None = None
    """None: <run dir>/data_cache."""
    num_workers: int = 0
    """DataLoader worker processes reading samples ahead of the step (0: in the trainer)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    steps: int = 20
    """The budget: steps, or tokens / samples (Megatron-LM's --train-samples), exactly one; tokens and samples give
    steps = ceil(budget / (global_batch_size [x seq_length])), printed at the start of training."""
    tokens: int | None = None
    samples: int | None = None
    rampup_batch_size: list | None = None
    """[start, increment, ramp samples]: Megatron-LM's --rampup-batch-size. The global batch starts at `start` and
    grows by `increment` over the first `ramp samples` samples to global_batch_size (start and increment
    multiples of micro_batch_size x DP; no virtual pipeline). Steps, the LR schedule and resume follow the
    samples consumed."""
    rampup_tokens: list | None = None
    """[start tokens, ramp tokens]: the same ramp in a paper's units (GPT-3: from 32K tokens over the first 4-12B),
    for any GPU count. At run time it becomes rampup_batch_size = [start, micro_batch_size x DP, ramp tokens /
    seq_length]: start is the smallest multiple of micro_batch_size x DP sequences holding start tokens, and the
    batch grows one micro-batch per DP rank at a time (the finest linear ramp the layout runs); printed at start."""
    seed: int = 1234
    eval_interval: int = 0
    """0: only at the end."""
    eval_iters: int = 2
    """Global batches per validation."""
    save_interval: int = 0
    """0: only at the end."""
    keep_checkpoints: int = 2
    checkpoint_threads: int = 1
    """Writer threads per rank for a checkpoint (torch.distributed.checkpoint): each rank writes its own shards."""
    resume: str | None = None
    """"auto": from <out_dir>/checkpoints/latest, or a checkpoint path."""
    out_dir: str = "runs/default"
    save: bool = True
    overwrite: bool = False
    """An out_dir that already holds a run (config.yaml, metrics.jsonl or checkpoints/) is an error without
    train.resume; overwrite=true replaces that run's outputs instead (once every check has passed)."""


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    wandb_project: str | None = None
    """Weights & Biases (pip install 'sift-megatron[wandb]'): the TensorBoard scalars, on rank 0 of the last stage;
    WANDB_MODE=offline writes them under <out_dir>/wandb without network (sync later with `wandb sync`)."""
    wandb_name: str | None = None
    """None: the run directory's name."""
    logits: bool = False
    """At the end of the run write <run dir>/logits.safetensors: full-vocabulary logits of the first validation
    micro-batch (the same samples at every layout), to compare TP/PP layouts and resharded checkpoints."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device for MFU; None: from the table of known GPUs in training/throughput.py
    (no MFU on CPUs and unknown GPUs)."""
    startup_watch_s: float = 60.0
    """Start-up watch: when building datasets, masks or the engine, or loading a checkpoint, takes longer than
    this many seconds, say what the run is doing (one line per period) instead of staying silent. 0: off."""


@dataclass
class SparsityConfig:
    family: Literal["dense", "wide", "parallel", "factorized", "doped"] = "dense"
    """The Sparse-IFT transformation of every transformed layer (QKV, proj, fc1, fc2)."""
    s: float = 0.0
    """Sparsity: the fraction of the sparse tensors' weights that are zero (per tensor or in total: distribution)."""
    distribution: Literal["uniform", "erk", "er"] = "uniform"
    """Density per sparse tensor: the same everywhere, or Erdos-Renyi(-Kernel) scaled, at the same total."""
    head_policy: Literal["keep_heads", "keep_head_dim"] = "keep_heads"
    """Sparse Wide: widen the heads (keep their number) or add heads (keep the head dim)."""
    exact_iso: bool = False
    """Sparse Wide: use s' = 1-(d/d')^2 so transformed layers are exactly iso-FLOP."""
    mask_seed: int | None = None
    """None: train.seed."""
    align: int = 1
    """GPU-friendly widths (ift/sizes.py): 1 keeps the paper's widths; > 1 rounds the Sparse Wide / Factorized /
    Doped widths (hidden, ffn, inner dims) to multiples of align, the head dim to min(align, 8), and re-solves
    s so the transformed layers stay exactly iso-FLOP (implies exact_iso); Sparse Parallel keeps the dense
    widths. Allowed: 1, 2, 4 or a multiple of 8 (tensor cores want 8 bf16 = 16 bytes; 64 fits their tiles)."""
    parallel_branch_activation: Literal["none", "gelu", "relu"] = "none"
    """Sparse Parallel, sum_j sigma(W_j z): fc1 always puts the model's activation on its branches (and the
    MLP's own one goes). QKV, proj and fc2 have no non-linearity in the dense model: none = linear branches
    (the paper's formula read literally), gelu / relu = a sigma on every branch there too (a design choice)."""
    pattern: str = "unstructured"
    """Mask structure (sparse/pattern.py): unstructured | block (nonzeros in whole block x block tiles of each
    [out, in] weight; block=1 is unstructured) | N:M, e.g. "2:4" (N of every M consecutive input elements,
    density N/M, so s must be 1 - N/M). Tiles and groups never straddle a TP shard (checked at mask init)."""
    block: int = 1
    """Tile side of pattern=block (see pattern)."""
    kernel: Literal["masked", "block"] = "masked"
    """How the sparse linears compute: masked = dense GEMMs over the zero-filled weight; block = GEMMs over the
    mask's nonzero b x b tiles only (sparse/block_linear.py: Triton on CUDA, a torch reference elsewhere), the same
    function. block needs pattern=block with block 16, 32, 64 or 128."""

    def __post_init__(self) -> None:
        self.check_align(self.align)

    @staticmethod
    def check_align(align: object) -> None:
        """One-line error unless align is 1, 2, 4 or a positive multiple of 8."""
        is_int = isinstance(align, int) and not isinstance(align, bool)
        if not (is_int and (align in (1, 2, 4) or (align > 0 and align % 8 == 0))):
            raise SiftError(f"sparsity.align must be 1, 2, 4 or a positive multiple of 8, got {align!r}")


@dataclass
class DSTConfig:
    algorithm: Literal["static", "set", "rigl"] = "static"
    """Dynamic sparse training: static masks, SET (grow at random) or RigL (grow by |dense gradient|)."""
    interval: int = 100
    """Optimizer steps between mask updates."""
    begin: int = 0
    """The step after which updates may run."""
    end: float = 0.75
    """A step (>= 1) or a fraction of train.steps (< 1); updates run strictly between begin and end."""
    drop_fraction: float = 0.3
    """f0: the share of each tensor's active weights dropped and regrown per update, annealed by `decay`."""
    decay: Literal["cosine", "constant", "exponential"] = "cosine"
    """How the drop fraction decays over [begin, end]."""
    exponential_rate: float = 1.0
    """exponential: f0 x exp(-rate x progress through [begin, end])."""


@dataclass
class SpectralConfig:
    interval: int = 0
    """0: off; else analyse masks every N steps and log the model averages (each stage scores its own layers,
    one logical layer at a time per rank; only the small per-layer records are gathered)."""
    export_masks: bool = True
    """At the end of a run (after the final checkpoint), write the logical masks and sparse weights to
    <run dir>/sparse_masks.safetensors. Streamed: rank 0 writes one tensor at a time as each stage assembles and
    sends it, so no process holds more than one logical tensor; but one process writes 5 B per sparse element,
    which takes a while for large models. The checkpoints hold the same sharded, and `sift spectral` reads those."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    dst: DSTConfig = field(default_factory=DSTConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)


# ----------------------------------------------------------------------------------------------------------
# Loading and validation


def _allowed(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce/validate one leaf value against its annotated type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(path, value, a)
            except SiftError as e:
                errors.append(str(e))
        raise SiftError(errors[0] if errors else f"bad value for {path}: {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise SiftError(f"config key {path} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SiftError(f"config key {path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise SiftError(f"config key {path} must be a number, got {value!r}")
    if tp is str or origin is Literal:  # the allowed values are checked by validate (_check_choices)
        if isinstance(value, str):
            return value
        raise SiftError(f"config key {path} must be a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
        raise SiftError(f"config key {path} must be a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise SiftError(f"config key {path} must be a mapping, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise SiftError(f"unknown config key '{path}' (allowed in {prefix.rstrip('.') or 'top level'}: {_allowed(cls)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise SiftError(f"config section '{path}' must be a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, tp)
    return cls(**kwargs)


def _merge(base: dict, new: dict, whole: tuple = ("extra",)) -> dict:
    """`new` over `base` in depth, except that a key in `whole` (zero.extra of a config) is replaced whole."""
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in whole:
            out[k] = _merge(out[k], v, whole)
        else:
            out[k] = v
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers, so `sparsity.pattern: 2:4` is the string "2:4", not 124."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in value:
            return "tag:yaml.org,2002:str"  # only base-60 numbers hold a colon
        return tag


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise SiftError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise SiftError(f"config include cycle at {path}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise SiftError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SiftError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    include = data.pop("include", None)
    _check_budget_layer(data, str(path))
    if include:
        base = _read_yaml((path.parent / include), (*seen, path.resolve()))
        data = _merge(_drop_replaced_budgets(base, data), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in item:
        raise SiftError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise SiftError(f"override '{item}' has an empty key part")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    layer: dict = {}  # the overrides on their own: two units of one budget among them are an error
    for item in overrides:
        parts, value = parse_override(item)
        if len(parts) == 2 and parts[0] in BUDGET_GROUPS:
            layer.setdefault(parts[0], {})[parts[1]] = value
    _check_budget_layer(layer, "the overrides")
    data = _drop_replaced_budgets(data, layer)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
            node[p] = dict(nxt)
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = _build(Config, data, "")
    validate(cfg)
    derive_budgets(cfg)
    if cfg.dst.algorithm != "static":
        dst_end_step(cfg.dst, cfg.train.steps)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Budgets in steps, tokens or samples: one unit per quantity. A later layer (a config over its include, an
# override over the file) that sets one unit replaces the others; two units in one layer are an error.

# (derived key, other units): one per quantity; the ramp is optional, the others are always in effect.
BUDGET_GROUPS = {"train": (("steps", "tokens", "samples"), ("rampup_batch_size", "rampup_tokens")),
                 "lr_schedule": (("warmup_steps", "warmup_tokens", "warmup_samples"),
                                 ("decay_steps", "decay_tokens", "decay_samples"))}


def _check_budget_layer(data: dict, where: str) -> None:
    for section, groups in BUDGET_GROUPS.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for group in groups:
            given = [k for k in group if sec.get(k) is not None]
            if len(given) > 1:
                raise SiftError(f"{section}.{given[0]} {sec[given[0]]} and {section}.{given[1]} {sec[given[1]]} are both "
                                f"set in {where}: give "
                                f"{'at most' if group[0] == 'rampup_batch_size' else 'exactly'} one of "
                                f"{', '.join(f'{section}.{k}' for k in group)}")


def _drop_replaced_budgets(base: dict, new: dict) -> dict:
    """`base` without the budget keys whose quantity `new` sets in another (or the same) unit."""
    out = dict(base)
    for section, groups in BUDGET_GROUPS.items():
        sec, nsec = out.get(section), new.get(section)
        if not isinstance(sec, dict) or not isinstance(nsec, dict):
            continue
        sec = dict(sec)
        for group in groups:
            if any(nsec.get(k) is not None for k in group):
                for k in group:
                    sec.pop(k, None)
        out[section] = sec
    return out


def _steps_for(amount: int, per_step: int) -> int:
    return -(-amount // per_step)  # ceil: at least the budget


class BatchSchedule:
    """The global batch of every step: fixed, or ramped up as megatron-core's RampupBatchsizeNumMicroBatchesCalculator
    does (same formula, checked in tests/test_rampup.py) as a pure function of the samples consumed, so resume is
    exact. The ramp's steps are tabulated once; after it every step has global_batch_size samples."""

    def __init__(self, cfg: Config) -> None:
        t = cfg.train
        self.gbs = t.global_batch_size
        self.before = [0]  # samples consumed before step i, for the ramp's steps
        if t.rampup_batch_size:
            start, inc, ramp = t.rampup_batch_size
            per_increment = ramp / ((self.gbs - start) // inc)
            while True:
                done = self.before[-1]
                batch = self.gbs if done > ramp else start + int(done / per_increment) * inc
                if batch == self.gbs:
                    break
                self.before.append(done + batch)

    def batch(self, step: int) -> int:
        """Global batch of step `step` (0-based)."""
        if step < len(self.before) - 1:
            return self.before[step + 1] - self.before[step]
        return self.gbs

    def samples_before(self, step: int) -> int:
        n = len(self.before) - 1
        return self.before[step] if step <= n else self.before[n] + (step - n) * self.gbs

    def nearest_step(self, samples: float) -> int:
        """The step boundary closest to `samples` (display of warm-up / decay lengths given in samples or tokens)."""
        k = self.steps_for(math.ceil(samples))
        return k - 1 if k > 0 and samples - self.samples_before(k - 1) < self.samples_before(k) - samples else k

    def steps_for(self, samples: int) -> int:
        """Fewest steps that consume at least `samples`."""
        n = len(self.before) - 1
        if samples <= self.before[n]:
            return next(i for i, done in enumerate(self.before) if done >= samples)
        return n + _steps_for(samples - self.before[n], self.gbs)


def _check_rampup(cfg: Config) -> None:
    t, r, rt = cfg.train, cfg.train.rampup_batch_size, cfg.train.rampup_tokens
    if (r is not None or rt is not None) and cfg.parallel.virtual_pipeline:
        raise SiftError(f"train.rampup_{'tokens' if rt is not None else 'batch_size'} needs parallel.virtual_pipeline "
                        f"null, got {cfg.parallel.virtual_pipeline} (megatron's interleaved schedule needs a "
                        "multiple of parallel.pipeline micro-batches in every step)")
    if rt is not None:
        if len(rt) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in rt):
            raise SiftError(f"train.rampup_tokens must be [start tokens, ramp tokens] (positive integers), got {rt}")
        if rt[0] >= t.global_batch_size * cfg.model.seq_length:
            raise SiftError(f"train.rampup_tokens {rt}: start {rt[0]:,} tokens must be below a global batch "
                            f"({t.global_batch_size} x {cfg.model.seq_length} tokens)")
    if r is None:
        return
    if len(r) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
        raise SiftError(f"train.rampup_batch_size must be [start, increment, ramp samples] (integers), got {r}")
    start, inc, ramp = r
    if not (0 < start < t.global_batch_size and inc > 0 and ramp > 0):
        raise SiftError(f"train.rampup_batch_size {r}: need 0 < start < global_batch_size {t.global_batch_size}, "
                        "increment > 0 and ramp samples > 0")
    if (t.global_batch_size - start) % inc:
        raise SiftError(f"train.rampup_batch_size {r}: global_batch_size {t.global_batch_size} - start {start} is not "
                        f"a multiple of the increment {inc}")
    if start % t.micro_batch_size or inc % t.micro_batch_size:
        raise SiftError(f"train.rampup_batch_size {r}: start and increment must be multiples of "
                        f"train.micro_batch_size {t.micro_batch_size}")


def rampup_for_layout(cfg: Config, dp_size: int) -> list | None:
    """The [start, increment, ramp samples] a run with `dp_size` data-parallel ranks uses (None: no ramp), or a
    one-line SiftError: every ramped batch must split into whole micro-batches on every data-parallel rank."""
    t, mbs = cfg.train, cfg.train.micro_batch_size
    unit = mbs * dp_size
    if t.rampup_tokens is not None:
        seq = cfg.model.seq_length
        start_tokens, ramp_tokens = t.rampup_tokens
        start = _steps_for(_steps_for(start_tokens, seq), unit) * unit
        if start >= t.global_batch_size:
            raise SiftError(f"train.rampup_tokens {t.rampup_tokens}: the smallest batch of whole micro-batches, "
                            f"micro_batch_size x DP = {mbs} x {dp_size} = {start} sequences, is not below "
                            f"global_batch_size {t.global_batch_size}; allowed: fewer data-parallel ranks, a smaller "
                            "micro_batch_size, or train.rampup_tokens=null")
        return [start, unit, _steps_for(ramp_tokens, seq)]
    r = t.rampup_batch_size
    if r and (r[0] % unit or r[1] % unit):
        raise SiftError(f"train.rampup_batch_size {r}: start and increment must be multiples of micro_batch_size x "
                        f"DP = {mbs} x {dp_size} (train.rampup_tokens fits the ramp to any layout)")
    return r


def resolve_rampup(cfg: Config, dp_size: int) -> None:
    """Fix the batch ramp for this data-parallel size (train.rampup_tokens -> train.rampup_batch_size), then
    derive the budgets again: steps of a tokens budget depend on the ramp's batches."""
    if cfg.train.rampup_tokens is not None or cfg.train.rampup_batch_size is not None:
        cfg.train.rampup_batch_size = rampup_for_layout(cfg, dp_size)
        derive_budgets(cfg)


def derive_budgets(cfg: Config) -> None:
    """Fill train.steps (and the display-only warmup_steps / decay_steps) from tokens / samples budgets."""
    t, s, seq = cfg.train, cfg.lr_schedule, cfg.model.seq_length
    _check_rampup(cfg)
    sched = BatchSchedule(cfg)
    if t.tokens is not None:
        t.steps = sched.steps_for(_steps_for(t.tokens, seq))
    elif t.samples is not None:
        t.steps = sched.steps_for(t.samples)
    warm, end = lr_units(cfg)  # independent of the display-only warmup_steps / decay_steps set below
    if s.warmup_tokens is not None or s.warmup_samples is not None:
        s.warmup_steps = sched.nearest_step(warm)
    if s.decay_tokens is not None or s.decay_samples is not None:
        s.decay_steps = max(0, sched.nearest_step(end) - s.warmup_steps)


def lr_units(cfg: Config) -> tuple[float, float]:
    """(warm-up length, end of the decay) in samples from the start: what the LR schedule follows."""
    t, s, seq = cfg.train, cfg.lr_schedule, cfg.model.seq_length
    sched = BatchSchedule(cfg)
    if s.warmup_tokens is not None:
        warm = s.warmup_tokens / seq
    elif s.warmup_samples is not None:
        warm = float(s.warmup_samples)
    else:
        warm = float(sched.samples_before(s.warmup_steps))
    warm_steps = s.warmup_steps if s.warmup_tokens is None and s.warmup_samples is None else sched.nearest_step(warm)
    if s.decay_tokens is not None:
        end = s.decay_tokens / seq
    elif s.decay_samples is not None:
        end = float(s.decay_samples)
    elif s.decay_steps is not None:
        end = float(sched.samples_before(warm_steps + s.decay_steps))
    else:
        end = float(sched.samples_before(t.steps))
    return warm, end


def budget_summary(cfg: Config) -> str:
    """One line: steps, tokens and samples of the run and its LR schedule (printed when training starts)."""
    t, seq = cfg.train, cfg.model.seq_length
    sched = BatchSchedule(cfg)
    warm, end = lr_units(cfg)
    samples = sched.samples_before(t.steps)
    ramp = (f" (ramped from {t.rampup_batch_size[0]:,} by {t.rampup_batch_size[1]:,} over the first "
            f"{len(sched.before) - 1:,} steps, {sched.samples_before(len(sched.before) - 1) * seq:,} tokens)"
            if t.rampup_batch_size else "")
    return (f"budget: {t.steps:,} steps x {t.global_batch_size:,} samples{ramp} x {seq:,} tokens = {samples:,} samples, "
            f"{samples * seq:,} tokens; LR warm-up {warm * seq:,.0f} tokens ({warm / t.global_batch_size:,.1f} steps), "
            f"{cfg.lr_schedule.style} decay until {end * seq:,.0f} tokens ({end / t.global_batch_size:,.1f} steps)")



def effective_zero_stage(cfg: Config, dp_size: int, *, stage: int | None = None, pipeline: int | None = None,
                         precision: str | None = None) -> int:
    """The ZeRO stage a run uses: the configured one, or 0 for one fp32/fp64 replica without pipelining
    (nothing to partition; bf16 needs stage >= 1: its fp32 master weights live in the ZeRO optimizer). The
    keyword arguments let `sift plan` ask about other layouts and precisions than the config's."""
    stage = cfg.zero.stage if stage is None else stage
    pipeline = cfg.parallel.pipeline if pipeline is None else pipeline
    precision = cfg.model.precision if precision is None else precision
    if (cfg.zero.stage0_when_single_replica and dp_size == 1 and pipeline == 1 and stage in (1, 2)
            and precision != "bf16"):
        return 0
    return stage

def one_of(name: str, value: object, allowed: tuple) -> None:
    """One-line error naming the key, the allowed values and the bad one."""
    if value not in allowed:
        listed = (f"one of {', '.join(map(str, allowed))}" if len(allowed) > 3
                  else f"{', '.join(map(str, allowed[:-1]))} or {allowed[-1]}")
        raise SiftError(f"{name} must be {listed}, got {value!r}")


def choices(section: type, key: str) -> tuple:
    """The allowed values of a Literal config field, e.g. choices(SparsityConfig, "family")."""
    return typing.get_args(typing.get_type_hints(section)[key])


def _check_choices(cfg: Config) -> None:
    """Every Literal field of every section holds one of its values (also for configs built in code)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f, tp in typing.get_type_hints(type(sub)).items():
            if typing.get_origin(tp) is Literal:
                one_of(f"{section.name}.{f}", getattr(sub, f), typing.get_args(tp))


# Allowed range of every numeric config key: (low, low included, high, high included). None values of
# optional keys mean "derive it" and are not checked. tests/test_robustness.py checks that every int/float
# field of the dataclasses is listed here.
_INF = math.inf
_SEED_MAX = 2**32 - 1  # numpy's RandomState (megatron's dataset shuffling) takes seeds in [0, 2**32)
RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "model.num_layers": (1, True, _INF, False),
    "model.hidden_size": (1, True, _INF, False),
    "model.num_attention_heads": (1, True, _INF, False),
    "model.ffn_hidden_size": (1, True, _INF, False),
    "model.seq_length": (1, True, _INF, False),
    "model.max_position_embeddings": (1, True, _INF, False),
    "model.vocab_size": (1, True, _INF, False),
    "model.make_vocab_size_divisible_by": (1, True, _INF, False),
    "model.init_std": (0, False, _INF, False),
    "model.hidden_dropout": (0, True, 1, False),
    "model.attention_dropout": (0, True, 1, False),
    "model.layernorm_epsilon": (0, False, _INF, False),
    "model.recompute_num_layers": (1, True, _INF, False),
    "parallel.tensor": (1, True, _INF, False),
    "parallel.pipeline": (1, True, _INF, False),
    "parallel.virtual_pipeline": (1, True, _INF, False),
    "zero.stage": (0, True, 3, True),
    "optimizer.lr": (0, False, _INF, False),
    "optimizer.min_lr": (0, True, _INF, False),
    "optimizer.beta1": (0, True, 1, False),
    "optimizer.beta2": (0, True, 1, False),
    "optimizer.eps": (0, False, _INF, False),
    "optimizer.weight_decay": (0, True, _INF, False),
    "optimizer.clip_grad": (0, True, _INF, False),
    "lr_schedule.warmup_steps": (0, True, _INF, False),
    "lr_schedule.decay_steps": (1, True, _INF, False),
    "lr_schedule.warmup_tokens": (0, True, _INF, False),
    "lr_schedule.warmup_samples": (0, True, _INF, False),
    "lr_schedule.decay_tokens": (0, True, _INF, False),
    "lr_schedule.decay_samples": (0, True, _INF, False),
    "data.mock_vocab_size": (2, True, _INF, False),
    "data.num_workers": (0, True, _INF, False),
    "train.micro_batch_size": (1, True, _INF, False),
    "train.global_batch_size": (1, True, _INF, False),
    "train.steps": (0, True, _INF, False),
    "train.tokens": (0, True, _INF, False),
    "train.samples": (0, True, _INF, False),
    "train.seed": (0, True, _SEED_MAX, True),
    "train.eval_interval": (0, True, _INF, False),
    "train.eval_iters": (1, True, _INF, False),
    "train.save_interval": (0, True, _INF, False),
    "train.keep_checkpoints": (1, True, _INF, False),
    "train.checkpoint_threads": (1, True, 64, True),
    "logging.log_interval": (1, True, _INF, False),
    "logging.startup_watch_s": (0, True, _INF, False),
    "logging.peak_tflops": (0, False, _INF, False),
    "sparsity.s": (0, True, 1, False),
    "sparsity.mask_seed": (0, True, _SEED_MAX, True),
    "sparsity.align": (1, True, _INF, False),
    "sparsity.block": (1, True, _INF, False),
    "dst.interval": (1, True, _INF, False),
    "dst.begin": (0, True, _INF, False),
    "dst.end": (0, False, _INF, False),
    "dst.drop_fraction": (0, True, 1, True),
    "dst.exponential_rate": (0, False, _INF, False),
    "spectral.interval": (0, True, _INF, False),
}


def _fmt_bound(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def allowed_range(key: str) -> str:
    """'>= 1', '> 0' or 'in [0, 1)': the words the one-line errors use."""
    lo, lo_in, hi, hi_in = RANGES[key]
    if hi == _INF:
        return f"{'>=' if lo_in else '>'} {_fmt_bound(lo)}"
    return f"in {'[' if lo_in else '('}{_fmt_bound(lo)}, {_fmt_bound(hi)}{']' if hi_in else ')'}"


def check_value(key: str, v: float | None) -> None:
    """One numeric key against RANGES (NaN and infinities fail every range; None: derived, not checked)."""
    lo, lo_in, hi, hi_in = RANGES[key]
    if v is not None and not (math.isfinite(v) and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
        raise SiftError(f"{key} must be {allowed_range(key)}, got {v}")


def check_ranges(cfg: Config) -> None:
    """Every numeric key against RANGES."""
    for key in RANGES:
        section, name = key.split(".")
        check_value(key, getattr(getattr(cfg, section), name))


def split_weights(split: str) -> list[float]:
    """data.split 'a,b,c' -> [a, b, c] normalised (missing parts are 0), or a one-line error."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(parts) <= 3 or len(weights) != len(parts) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise SiftError(f"data.split must be up to 3 comma-separated weights >= 0 for train,valid,test "
                        f"(e.g. 98,1,1), got {split!r}")
    weights += [0.0] * (3 - len(weights))
    if weights[0] <= 0:
        raise SiftError(f"data.split must give the train split a weight > 0, got {split!r}")
    total = sum(weights)
    return [w / total for w in weights]


def validate(cfg: Config) -> None:
    """Checks that need no world size; layout.check_layout adds those of the world at launch."""
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise SiftError(f"zero.stage must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    check_ranges(cfg)
    _check_choices(cfg)
    m, p = cfg.model, cfg.parallel
    if m.hidden_size % m.num_attention_heads:
        raise SiftError(f"model.hidden_size {m.hidden_size} is not divisible by model.num_attention_heads "
                        f"{m.num_attention_heads}")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise SiftError(f"model.max_position_embeddings must be >= model.seq_length {m.seq_length}, got "
                        f"{m.max_position_embeddings}")
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise SiftError(f"optimizer.min_lr must be <= optimizer.lr {cfg.optimizer.lr}, got {cfg.optimizer.min_lr}")
    if not cfg.data.mock and not cfg.data.valid_prefixes:
        split_weights(cfg.data.split)
    if cfg.train.resume is not None and cfg.train.overwrite:
        raise SiftError(f"train.overwrite=true replaces the run in train.out_dir, train.resume={cfg.train.resume!r} "
                        "continues it; set one of them")
    if m.recompute != "full" and m.recompute_num_layers != 1:
        raise SiftError(f"model.recompute_num_layers {m.recompute_num_layers} needs model.recompute=full, "
                        f"got {m.recompute!r}")
    problems = split_problems(cfg, p.tensor, p.pipeline, p.virtual_pipeline, p.sequence_parallel)
    if problems:
        raise SiftError(problems[0])
    from sift_megatron.pattern import check_kernel, parse_pattern  # no torch

    check_kernel(cfg.sparsity.kernel, parse_pattern(cfg.sparsity.pattern, cfg.sparsity.block), cfg.sparsity.family)


def split_problems(cfg: Config, tp: int, pp: int, vp: int | None, sp: bool) -> list[str]:
    """Why the model cannot split over TP x PP (x VP chunks) with sequence parallelism `sp`, one line per broken
    rule, at any world size: validate asks about the config's own layout; layout.layout_problems adds the rules
    of a world size and ZeRO stage, for `sift train` and the layouts `sift plan` tries."""
    m, chunks = cfg.model, pp * (vp or 1)
    per_stage, k = m.num_layers // chunks, m.recompute_num_layers
    own = (pp, vp) == (cfg.parallel.pipeline, cfg.parallel.virtual_pipeline)  # else name the layout, not the keys
    rules = [
        (m.num_attention_heads % tp, f"model.num_attention_heads {m.num_attention_heads} is not divisible by "
                                     f"parallel.tensor {tp}"),
        (m.ffn % tp, f"model.ffn_hidden_size {m.ffn} is not divisible by parallel.tensor {tp}"),
        (m.num_layers % chunks, f"model.num_layers {m.num_layers} is not divisible by parallel.pipeline x "
                                f"virtual_pipeline = {chunks}"),
        (vp is not None and pp < 2, f"parallel.virtual_pipeline {vp} needs parallel.pipeline >= 2 and a value >= 1"),
        (sp and tp < 2, "parallel.sequence_parallel needs parallel.tensor >= 2"),
        (sp and m.seq_length % tp, f"model.seq_length {m.seq_length} is not divisible by parallel.tensor {tp} "
                                   "(needed for sequence parallel)"),
        (m.recompute == "full" and per_stage % k,
         f"layers per pipeline stage (model.num_layers {m.num_layers} / parallel.pipeline x virtual_pipeline "
         f"{chunks} = {per_stage}) are not divisible by model.recompute_num_layers {k}" if own
         else f"layers per stage {per_stage} not divisible by recompute_num_layers {k}"),
    ]
    return [message for broken, message in rules if broken]


def resolve_end(end: float, total_steps: int | None) -> int:
    """`dst.end` below 1 is a fraction of total_steps (int(end * total), as cbsparse), otherwise a whole step."""
    if end >= 1 and end != int(end):
        raise SiftError(f"dst.end must be a whole step when >= 1, got {end}")
    if end < 1 and total_steps is None:
        raise SiftError(f"dst.end={end} is a fraction of the run, so the total number of steps is needed")
    return int(end) if end >= 1 else int(end * total_steps)


def dst_end_step(d: DSTConfig, total_steps: int | None) -> int:
    """The step where mask updates stop, or a one-line error: the schedule's dst keys in RANGES and an end after
    dst.begin. load_config checks it for RigL / SET runs; dst.DSTSchedule asks again with the final steps."""
    for name in ("interval", "begin", "end", "drop_fraction", "exponential_rate"):
        check_value(f"dst.{name}", getattr(d, name))
    one_of("dst.decay", d.decay, choices(DSTConfig, "decay"))
    end = resolve_end(d.end, total_steps)
    if end <= d.begin:
        raise SiftError(f"dst.end (step {end}) must come after dst.begin (step {d.begin})")
    return end


# DeepSpeed keys the generated config always sets from the sift config: a different value in zero.config_file or
# zero.extra would be silently replaced, so it is an error instead.
_OWNED = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
          "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
          "gradient_clipping": "optimizer.clip_grad"}


def deepspeed_overrides(cfg: Config, check: bool = True) -> dict:
    """zero.config_file, read; check: it and zero.extra are honoured or rejected here, before anything is written."""
    conf: dict = {}
    if cfg.zero.config_file:
        path = Path(cfg.zero.config_file)
        if not path.is_file():
            raise SiftError(f"zero.config_file not found: {path} (give a DeepSpeed .json or .yaml file)")
        import json

        try:
            conf = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text()) or {}
        except (ValueError, yaml.YAMLError) as e:
            raise SiftError(f"zero.config_file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                            f"{first_line(e)}") from None
        if not isinstance(conf, dict):
            raise SiftError(f"zero.config_file {path} must hold a mapping of DeepSpeed settings, got "
                            f"{type(conf).__name__}")
    sources = ((f"zero.config_file {cfg.zero.config_file}", conf), ("zero.extra", cfg.zero.extra))
    for source, d in sources if check else ():
        zo = d.get("zero_optimization")
        if isinstance(zo, dict) and "stage" in zo and zo["stage"] != cfg.zero.stage:
            raise SiftError(f"{source} sets zero_optimization.stage {zo['stage']} but zero.stage is "
                            f"{cfg.zero.stage}; the sift config decides the stage: set zero.stage={zo['stage']} "
                            "or make them equal")
        for key, owner in _OWNED.items():
            if key in d:
                raise SiftError(f"{source} sets {key} ({d[key]!r}), which sift derives from {owner}; "
                                f"remove it and set {owner} instead")
    merged = _merge(conf, cfg.zero.extra, whole=())
    for key in ("bf16", "fp16") if check and cfg.model.precision != "bf16" else ():
        if (merged.get(key) or {}).get("enabled"):
            raise SiftError(f"DeepSpeed {key} is enabled in zero.extra / zero.config_file but model.precision is "
                            f"{cfg.model.precision}; set model.precision=bf16 instead (megatron must build the "
                            "model in that dtype)")
    return conf


def deepspeed_config(cfg: Config, dp_size: int, accum: int, check: bool = True) -> dict:
    """The DeepSpeed config of a run with `dp_size` replicas and `accum` micro-batches per step: zero.config_file,
    the settings sift derives, then zero.extra merged in depth (a nested key adds to its section, the others
    stay); the sift config decides the stage. The engine builds with it, `sift plan` reads it (check=False)."""
    t, pp, stage = cfg.train, cfg.parallel.pipeline, effective_zero_stage(cfg, dp_size)
    conf = deepspeed_overrides(cfg, check)
    if pp > 1:  # the megatron schedule accumulates over micro-batches; step() is the boundary
        conf.update(train_micro_batch_size_per_gpu=t.micro_batch_size * accum, gradient_accumulation_steps=1,
                    managed_gradient_accumulation=False)
    else:
        conf.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=accum)
    conf["train_batch_size"] = t.micro_batch_size * accum * dp_size
    # Stage 0: DeepSpeed clips without recording the norm, so the trainer clips (clip_grads_stage0).
    conf["gradient_clipping"] = cfg.optimizer.clip_grad if stage > 0 else 0.0
    if cfg.model.precision == "bf16":
        # bf16 module; DeepSpeed keeps fp32 master weights + Adam state, reduces grads in fp32 and, with PP=1,
        # accumulates them in fp32 (ZeRO-1: BF16_Optimizer). Under megatron's pipeline schedule BF16_Optimizer
        # never moves the grads into its fp32 buffer (torch-style backward skips engine.backward's epilogue:
        # ranks deadlock in the grad-norm all-reduce), so PP runs DeepSpeed's ZeRO-1 with bf16 accumulation.
        conf["bf16"] = {**conf.get("bf16", {}), "enabled": True}
        conf["data_types"] = {**conf.get("data_types", {}), "grad_accum_dtype": "fp32" if pp == 1 else "bf16"}
        conf.setdefault("communication_data_type", "fp32")
    conf.setdefault("steps_per_print", 10**9)
    conf.setdefault("wall_clock_breakdown", False)
    conf["zero_allow_untested_optimizer"] = True
    conf = _merge(conf, cfg.zero.extra, whole=())
    conf["zero_optimization"] = {**(conf.get("zero_optimization") or {}), "stage": stage}
    return conf


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def atomic_write(path: str | os.PathLike, write, fault: str = "atomic_write") -> Path:
    """write(tmp) to a temp file beside the target, then rename: readers never see half a file, and a kill at
    any moment leaves the old file (`fault`: the crash-test point between the two)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text), "atomic_write_text")


def save_resolved(cfg: Config, path: str | os.PathLike) -> None:
    """The config as run. Step counts derived from tokens / samples are left out: reloading derives them again."""
    d = to_dict(cfg)
    for section, groups in BUDGET_GROUPS.items():
        for steps_key, *others in groups:
            if any(d[section][k] is not None for k in others):
                del d[section][steps_key]
    atomic_write_text(path, yaml.safe_dump(d, sort_keys=False))
