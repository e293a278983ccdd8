"""Let megatron-core 0.16 run on CPU with gloo: CPU-only shims, never used on GPUs.

megatron-core targets CUDA and calls CUDA APIs unconditionally (`torch.cuda.current_device()` in
RoPE, tensor-parallel mappings and grad buffers; `device="cuda"` in the pipeline schedules and the
grad-norm code; CUDA RNG states in its model-parallel RNG tracker; CUDA type names checked by the
optimizers). `enable_megatron_on_cpu()` patches exactly those points so that the same
megatron-core code (model, TP/PP communication, DDP, optimizer, dist_checkpointing) runs on CPU
processes joined by gloo; this is how the Megatron backend is tested without GPUs.

Only a worker whose device is the CPU calls it (and only on a machine without CUDA; it refuses
otherwise): the modules of the GPU path (`model_builder`, `hf_conversion`, `parallel_state`) do not
import this one. `disable_megatron_on_cpu()` undoes every patch.

Shims, in the order megatron-core meets them:
- `torch.cuda.current_device()` answers `torch.device("cpu")`: used as a `device=` argument.
- `torch.cuda.synchronize()` does nothing (there is no asynchronous device to wait for).
- a `TorchFunctionMode` turns `device="cuda"` (any index) into the CPU in tensor factories and
  `.to(...)`, and makes `Tensor.cuda()` a no-op.
- megatron-core's model-parallel RNG tracker keeps its named streams as CPU generator states.
- the default causal mask is built on the CPU.
- `Tensor.type()` (without arguments) names a CPU tensor with CUDA's type name
  (`torch.cuda.FloatTensor`), which the optimizers and `clip_grad` assert on.
Megatron's `sequence_parallel` needs Transformer Engine or apex norms and is GPU-only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
# (object, attribute name, original value) for every patch in place; empty when disabled.
_patches: list[tuple[Any, str, Any]] = []
_device_mode: _CudaDeviceToCpu | None = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """`device="cuda"` -> CPU in every torch function call; `.cuda()` and `.to("cuda")` stay put."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron-core's `CudaRNGStatesTracker` interface over CPU generator states.

    `fork(name)` swaps the process's CPU generator to the named stream for the duration of the
    block and back afterwards, as megatron-core's tracker does with the CUDA generator, so that
    dropout inside tensor-parallel regions draws from a per-TP-rank stream.
    """

    def __init__(self):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _tensor_type_with_cuda_names(original: Callable) -> Callable:
    def type_(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    return type_


def _patch(obj: Any, name: str, value: Any) -> None:
    _patches.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def megatron_on_cpu_enabled() -> bool:
    return bool(_patches)


def enable_megatron_on_cpu() -> None:
    """Install the CPU shims (idempotent). Call before `parallel_state.initialize_model_parallel`
    and before building the model, in a process without CUDA.

    Raises:
        RuntimeError: CUDA is available; the shims would send a GPU run's tensors to the CPU.
    """
    global _device_mode
    with _lock:
        if _patches:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "enable_megatron_on_cpu() is for processes without CUDA; this one sees "
                f"{torch.cuda.device_count()} GPU(s): run megatron-core on them instead"
            )
        import megatron.core.fusions.fused_softmax as fused_softmax
        import megatron.core.tensor_parallel.random as mp_random
        import megatron.core.transformer.utils as transformer_utils

        _patch(torch.cuda, "current_device", lambda: _CPU)
        _patch(torch.cuda, "synchronize", lambda device=None: None)
        _patch(torch.Tensor, "type", _tensor_type_with_cuda_names(torch.Tensor.type))
        _patch(transformer_utils, "get_default_causal_mask", _cpu_causal_mask)
        _patch(fused_softmax, "get_default_causal_mask", _cpu_causal_mask)
        _patch(mp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
        _patch(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
        # model_parallel_cuda_manual_seed seeds CUDA's default generator too; without CUDA,
        # the CPU one is the default generator.
        _patch(torch.cuda, "manual_seed", lambda seed: None)
        _device_mode = _CudaDeviceToCpu()
        _device_mode.__enter__()


def disable_megatron_on_cpu() -> None:
    """Undo `enable_megatron_on_cpu` (no-op when not enabled)."""
    global _device_mode
    with _lock:
        if _device_mode is not None:
            _device_mode.__exit__(None, None, None)
            _device_mode = None
        while _patches:
            obj, name, original = _patches.pop()
            setattr(obj, name, original)
