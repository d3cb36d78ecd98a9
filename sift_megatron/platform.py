"""Device and backend choice, and the ONLY place that shims CUDA-only code of megatron-core / DeepSpeed.

On CUDA nothing here patches anything: `setup()` picks cuda + nccl and returns. On a CPU-only torch build it
picks cpu + gloo and applies the shims below, which target private internals of exactly
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
# CPU shims


class _CpuTorchProxy(types.ModuleType):
    """Stands in for `torch` inside a megatron module: factory calls with device='cuda' go to the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    @staticmethod
    def _redirect(fn):
        def wrapper(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        return wrapper

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _apply_cpu_shims() -> None:
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as tutils
    from megatron.core.transformer import torch_norm

    proxy = _CpuTorchProxy()
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
