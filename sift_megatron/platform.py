"""Device and backend choice, and the ONLY place that shims or reads private internals of megatron-core /
DeepSpeed (here: the CPU shims, tensors-only loads, ZeRO partition fragments, the fp64 gradient all-reduce).

On every device `setup()` makes the libraries' file loads tensors-only (see "Loading never runs code"). On CUDA
nothing else is patched: it picks cuda + nccl and returns. On a CPU-only torch build it picks cpu + gloo and
applies the CPU shims below, which target private internals of exactly
megatron-core 0.16.1 and deepspeed 0.19.8 (pinned in pyproject.toml; re-verify on upgrade). What fails
without each shim is recorded in ../shared/docs/megatron-core-on-cpu.md and deepspeed-on-cpu.md.

Instead of a process-wide TorchFunctionMode (10 % overhead on every op), the hard-coded `device="cuda"`
factory calls are redirected only inside the megatron modules that contain them, through a thin proxy of
the `torch` module bound to those modules' globals.
"""

from __future__ import annotations

import datetime
import logging
import os
import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


_PLATFORM: Platform | None = None


def detect() -> Platform:
    if torch.cuda.is_available() and os.environ.get("SIFT_FORCE_CPU", "0") != "1":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Platform(torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl")
    return Platform(torch.device("cpu"), "gloo")


def quiet_warnings() -> None:
    """megatron-core warns at import about missing Apex/TE and deprecated paths on every rank; the
    fallbacks are what we use on purpose."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "megatron.core", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)


def setup() -> Platform:
    """Choose the device/backend once per process and, on CPU, apply the shims (idempotent)."""
    global _PLATFORM
    if _PLATFORM is None:
        quiet_warnings()
        _PLATFORM = detect()
        if not _PLATFORM.is_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's probing (and its warning)
        if _PLATFORM.is_cuda:
            torch.cuda.set_device(_PLATFORM.device)
            # fp32 runs use TF32 tensor cores (Ampere and newer), as Megatron-LM and HF Trainer users expect.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            _apply_cpu_shims()
        _apply_no_pickle_shims()
    return _PLATFORM


def current() -> Platform:
    return _PLATFORM or setup()


def init_distributed(timeout_minutes: int = 30) -> Platform:
    """Initialise torch.distributed (and DeepSpeed's comm layer) for torchrun or a single process."""
    plat = setup()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=plat.backend,
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    import deepspeed

    if not plat.is_cuda:
        _disable_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend=plat.backend, auto_mpi_discovery=False)
    return plat


# ----------------------------------------------------------------------------------------------------------
# Loading never runs code (every device)
#
# DeepSpeed reads its checkpoint files with torch.load(weights_only=False) and megatron its dataset index cache
# with numpy.load(allow_pickle=True): a crafted mp_rank_00_model_states.pt or *document_index.npy would run code
# on resume. Inside exactly those modules `torch.load` / `numpy.load` are replaced (through module proxies, as
# for the CPU shims) by readers that only build tensors / plain arrays and refuse anything else with a one-line
# SiftError naming the file, before any of its objects is built.

_DEEPSPEED_TORCH_LOADERS = ("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",
                            "deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine",
                            "deepspeed.runtime.checkpoint_engine.decoupled_checkpoint_engine",
                            "deepspeed.runtime.base_optimizer", "deepspeed.runtime.zero.stage3")
_MEGATRON_NUMPY_LOADERS = ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
                           "megatron.core.datasets.masked_dataset")


def _deepspeed_record_types() -> list:
    """The non-tensor types DeepSpeed 0.19.8 pickles into ZeRO / bf16 optimizer files (LossScaler,
    ZeroStageEnum, fragment_address: found in fp32 / bf16 / fp64 checkpoints at ZeRO 0-2; DynamicLossScaler
    is fp16's). Allowlisted for weights_only: the unpickler may build them (plain attribute records and an
    enum), never call anything else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_tensors(f, map_location=None, **kwargs):
    """torch.load with weights_only=True (tensors, plain containers, DeepSpeed's record types); a file with
    anything else, or not a torch file at all, is a one-line SiftError naming it."""
    import pickle

    from sift_megatron.errors import SiftError, first_line

    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_record_types()):
            return torch.load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines()]
        why = next((x for x in lines if "nsupported" in x), "")  # torch names the refused global here
        raise SiftError(f"{f}: refused to load: it holds Python objects other than tensors, and unpickling them "
                        f"could run code{': ' + why if why else ''}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise SiftError(f"{f}: not a readable torch file (corrupt or truncated): "
                        f"{first_line(e)}") from None


def load_plain_npy(file, *args, **kwargs):
    """numpy.load with allow_pickle=False: a cache file holding pickled objects (or not a .npy at all) is a
    one-line SiftError naming it; deleting it makes megatron rebuild the cache."""
    import numpy

    from sift_megatron.errors import SiftError, first_line

    kwargs["allow_pickle"] = False
    try:
        return numpy.load(file, *args, **kwargs)
    except (ValueError, EOFError) as e:
        why = ("it holds pickled data, and unpickling it could run code" if "pickle" in str(e) or "object" in str(e)
               else first_line(e))
        raise SiftError(f"data cache file {file} is not a plain numpy array ({why}): delete it and megatron "
                        f"rebuilds the index cache") from None


class _ModuleProxy(types.ModuleType):
    """Stands in for a module (torch, numpy) inside one library module, overriding a few attributes."""

    def __init__(self, module: types.ModuleType, **overrides) -> None:
        super().__init__(module.__name__)
        self._module = module
        for k, v in overrides.items():
            setattr(self, k, v)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _apply_no_pickle_shims() -> None:
    import importlib

    import numpy

    for name in _DEEPSPEED_TORCH_LOADERS:
        mod = importlib.import_module(name)
        mod.torch = _ModuleProxy(torch, load=load_tensors)
    for name in _MEGATRON_NUMPY_LOADERS:
        mod = importlib.import_module(name)
        mod.numpy = _ModuleProxy(numpy, load=load_plain_npy)


# ----------------------------------------------------------------------------------------------------------
# CPU shims


_CUDA_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")


def _on_cpu(fn):
    """A torch factory whose device='cuda' (and pin_memory) calls build CPU tensors instead."""

    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _apply_cpu_shims() -> None:
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as tutils
    from megatron.core.transformer import torch_norm

    # Stands in for `torch` inside a megatron module: factory calls with device='cuda' go to the CPU.
    proxy = _ModuleProxy(torch, **{name: _on_cpu(getattr(torch, name)) for name in _CUDA_FACTORIES})
    # schedules.py: total_num_tokens = torch.zeros([], device="cuda") in every schedule.
    schedules.torch = proxy
    # transformer/utils.py: default causal masks built with device="cuda".
    tutils.torch = proxy
    # Global memory buffer, RoPE, sequence-parallel all-gather buffers, p2p shapes.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p_communication and dist_checkpointing call torch.cuda.synchronize().
    torch.cuda.synchronize = lambda *a, **k: None
    # language_module: weight.data.cuda() for tied embeddings with PP > 1.
    torch.Tensor.cuda = lambda self, *a, **k: self

    # RNG tracker: keep CPU generator states so tracker.fork() (entered by attention even at dropout 0)
    # swaps the CPU RNG in and out, giving per-TP-rank streams as on GPU. The same two functions are all that
    # activation recompute (tensor_parallel.checkpoint, model.recompute) needs: CheckpointFunction saves and
    # restores "cuda" + tracker states through them, so recomputed dropout masks equal the original ones
    # (tests/test_recompute.py checks this bit for bit at dropout 0.1).
    def _get(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = _get
    mrandom._set_cuda_rng_state = _set
    mrandom.CudaRNGStatesTracker.add = add
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)

    # Local-spec norms refuse sequence parallel (only Apex/TE allow it); a torch LayerNorm is correct under
    # SP as long as its params are tagged so their grads are all-reduced over the TP group.
    def norm_new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                 normalization="LayerNorm"):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        m = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in m.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return m

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(norm_new)


def _disable_deepspeed_shm_comm() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op at init on CPU (tens of seconds, needs g++);
    gloo is enough for us, so mark the op incompatible and skip the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2 and BF16_Optimizer partitions (private: `_hp_mapping`, the flat fp32 partition per group)
@dataclass
class ZeroFragment:
    """The part of a parameter this DP rank's optimizer partition holds: elements [start, start + numel) of the
    flattened (TP-local) parameter, as views of its fp32 master and of its optimizer state (exp_avg, ...)."""

    start: int
    numel: int
    master: torch.Tensor
    states: dict[str, torch.Tensor]


def zero_fragment(p: torch.nn.Parameter, optimizer) -> ZeroFragment | None:
    """None when the optimizer is not partitioned (ZeRO-0: the torch optimizer owns p) or holds no part of p
    on this rank. The states are those the inner optimizer has created (none before its first step)."""
    hm = getattr(p, "_hp_mapping", None)
    if hm is None:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    lp, hp = hm.lp_fragment_address, hm.hp_fragment_address
    flat = inner.param_groups[hm.param_group_index]["params"][0]  # the group's flat fp32 partition
    states = {k: v.view(-1).narrow(0, hp.start, hp.numel) for k, v in inner.state.get(flat, {}).items()
              if torch.is_tensor(v) and v.numel() == flat.numel()}
    return ZeroFragment(lp.start, lp.numel, hm.get_hp_fragment(), states)


def install_fp64_allreduce(engine) -> None:
    """Stage-0 gradient averaging over DP for fp64: DeepSpeed's own accepts only the accelerator's dtypes
    (fp32/bf16/fp16). Sum then divide, as DeepSpeed does, so DP=2 equals DP=1 with 2 micro-batches bit for bit."""
    from megatron.core import parallel_state as ps
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from sift_megatron import comm

    def allreduce_gradients(bucket_size: int = 0) -> None:
        dp = ps.get_data_parallel_world_size()
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if dp == 1 or not grads or not engine.is_gradient_accumulation_boundary():
            return
        flat = _flatten_dense_tensors(grads)
        comm.all_reduce(flat, group=ps.get_data_parallel_group())
        flat.div_(dp)
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)

    engine.allreduce_gradients = allreduce_gradients
