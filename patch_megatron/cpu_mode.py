"""CPU mode: run megatron-core's real code paths on CPU with the gloo backend.

megatron-core 0.16 assumes CUDA in a few dozen places: tensors created with
``device="cuda"`` or ``device=torch.cuda.current_device()``, calls such as
``torch.cuda.synchronize()``, the CUDA RNG tracker, and one grad-type assert
in gradient clipping. This module is the only place in patch-megatron that
patches megatron-core or torch, and it does so narrowly:

* every loaded ``megatron.core.*`` module gets its own view of ``torch`` (and of
  ``torch.cuda``) in which device arguments that name CUDA are mapped to the
  CPU and CUDA bookkeeping calls are no-ops. The real ``torch`` module, and
  every module outside megatron-core, is left untouched;
* megatron's RNG tracker is replaced by one that forks the CPU generator;
* ``clip_grad_by_total_norm_fp32`` is replaced by the same computation
  without the ``torch.cuda.FloatTensor`` assert;
* a few megatron methods run with a ``Tensor`` method replaced for their
  duration: ``LanguageModule.setup_embeddings_and_output_layer`` (tied
  embeddings under pipeline parallelism) and the fp16 loss scaler's
  ``load_state_dict`` with ``Tensor.cuda()`` a no-op; the mixed-precision and
  distributed optimizers' constructors with ``Tensor.type()`` naming CPU
  tensors as CUDA ones, which they sort parameters by;
* the torch Adam/AdamW that megatron-core falls back to without TE or apex
  take torch's fused CPU kernel by default (same update, several times faster).

Modules of megatron-core imported after :func:`install` are patched as they
load. Nothing here runs unless :func:`install` is called, and
:func:`should_use_cpu_mode` only answers yes without CUDA or when asked to, so
the GPU path never sees any of it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types

import torch

logger = logging.getLogger(__name__)

ENV_FLAG = "PATCH_MEGATRON_CPU"  # "1" forces CPU mode, "0" forbids it

_installed = False


def should_use_cpu_mode(override: bool | None = None) -> bool:
    """True when CPU mode is asked for (flag or env) or when no GPU exists."""
    if override is None and os.environ.get(ENV_FLAG, "") in ("0", "1"):
        override = os.environ[ENV_FLAG] == "1"
    if override is not None:
        return override
    return not torch.cuda.is_available()


def is_installed() -> bool:
    return _installed


def maybe_install(override: bool | None = None) -> bool:
    """Install CPU mode if :func:`should_use_cpu_mode` says so; return whether it is on."""
    if should_use_cpu_mode(override):
        install()
    return _installed


# ---------------------------------------------------------------------------
# The torch views seen by megatron-core modules.

def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare ordinal means a CUDA device in torch


_FACTORIES = (
    "tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "eye",
    "empty_like", "zeros_like", "ones_like", "full_like", "empty_strided",
    "rand", "randn", "randint", "randperm", "linspace",
)


def _on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA runtime
        return factory(*args, **kwargs)

    factory_on_cpu.__name__ = factory.__name__
    factory_on_cpu.__wrapped__ = factory
    return factory_on_cpu


def _noop(*args, **kwargs):
    return None


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _make_cuda_view() -> types.ModuleType:
    view = types.ModuleType("torch.cuda")
    view.__dict__.update(torch.cuda.__dict__)
    view.__getattr__ = lambda name: getattr(torch.cuda, name)
    view.current_device = lambda: "cpu"
    view.synchronize = _noop
    view.empty_cache = _noop
    view.set_device = _noop
    view.manual_seed = torch.manual_seed
    view.manual_seed_all = torch.manual_seed
    view.get_rng_state = lambda device=None: torch.get_rng_state()
    view.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    view.random = types.SimpleNamespace(
        get_rng_state=view.get_rng_state, set_rng_state=view.set_rng_state
    )
    view.Stream = _NullStream
    view.Event = _NullStream
    view.current_stream = lambda *a, **k: _NullStream()
    view.default_stream = lambda *a, **k: _NullStream()
    view.stream = lambda *a, **k: contextlib.nullcontext()
    view.memory_allocated = lambda *a, **k: 0
    view.max_memory_allocated = lambda *a, **k: 0
    view.reset_peak_memory_stats = _noop
    view.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=contextlib.nullcontext)
    return view


def _make_torch_view(cuda_view: types.ModuleType) -> types.ModuleType:
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    # torch loads some submodules lazily through a module __getattr__.
    view.__getattr__ = lambda name: getattr(torch, name)
    view.cuda = cuda_view
    view.optim = _optim_view()
    for name in _FACTORIES:
        setattr(view, name, _on_cpu(getattr(torch, name)))
    return view


# ---------------------------------------------------------------------------
# Replacements for the few megatron functions that cannot run on CPU.

def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # megatron's version asserts torch.cuda.FloatTensor grads; the math is this.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _fused_by_default(optimizer_class):
    """``optimizer_class`` that takes torch's fused CPU kernel unless told otherwise.

    Without TE or apex megatron-core builds torch's AdamW, whose default on CPU
    is a per-tensor Python loop: 84 ms a step for 19.6M parameters here, 12.8 ms
    fused, a fixed per-step cost that would otherwise cap the patch stage's
    speed-up (it runs K times fewer positions per step, not fewer parameters).
    """

    class FusedByDefault(optimizer_class):
        def __init__(self, params, *args, **kwargs):
            kwargs.setdefault("fused", True)
            super().__init__(params, *args, **kwargs)

    FusedByDefault.__name__ = FusedByDefault.__qualname__ = optimizer_class.__name__
    return FusedByDefault


def _optim_view() -> types.ModuleType:
    view = types.ModuleType("torch.optim")
    view.__dict__.update(torch.optim.__dict__)
    view.Adam, view.AdamW = _fused_by_default(torch.optim.Adam), _fused_by_default(torch.optim.AdamW)
    return view


def _with_tensor_methods(method, **replacements):
    """Run a megatron method with some ``torch.Tensor`` methods replaced for its duration.

    A Tensor method cannot be redirected by the module views, so the few
    megatron methods that call one with a CUDA assumption are wrapped here.
    """
    import functools

    @functools.wraps(method)
    def on_cpu(*args, **kwargs):
        real = {name: getattr(torch.Tensor, name) for name in replacements}
        for name, replacement in replacements.items():
            setattr(torch.Tensor, name, replacement(real[name]))
        try:
            return method(*args, **kwargs)
        finally:
            for name, original in real.items():
                setattr(torch.Tensor, name, original)

    return on_cpu


def _cuda_is_noop(real_cuda):
    # LanguageModule.setup_embeddings_and_output_layer moves the tied embedding
    # to CUDA before all-reducing it between the first and last pipeline stages;
    # the fp16 loss scaler moves its restored scale there.
    return lambda self, *args, **kwargs: self


def _type_names_cuda(real_type):
    # megatron's mixed-precision and distributed optimizers sort parameters by
    # their type() string ('torch.cuda.BFloat16Tensor', ...) and refuse the rest.
    def type_(self, *args, **kwargs):
        name = real_type(self, *args, **kwargs)
        if args or kwargs or self.is_cuda or not name.startswith("torch."):
            return name
        return "torch.cuda." + name[len("torch."):]

    return type_


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker on the CPU generator (named states, fork, save/restore)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


# ---------------------------------------------------------------------------
# Installation.

_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.transformer",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing",
)

_replacements: dict[int, object] = {}
_originals: dict[object, object] = {}  # holds the replaced objects so their ids stay unique


def _patch_module(module: types.ModuleType) -> None:
    namespace = getattr(module, "__dict__", None)
    if not namespace:
        return
    for key, value in list(namespace.items()):
        replacement = _replacements.get(id(value))
        if replacement is not None and value is not replacement:
            namespace[key] = replacement


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    """Patches megatron-core modules that are first imported after install()."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _patch_module(module)

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Make megatron-core run on CPU/gloo. Idempotent; refuses nothing, changes only megatron."""
    global _installed
    if _installed:
        return
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom

    cuda_view = _make_cuda_view()
    torch_view = _make_torch_view(cuda_view)
    originals = {
        torch: torch_view,
        torch.cuda: cuda_view,
        mrandom._get_cuda_rng_state: _get_cpu_rng_state,
        mrandom._set_cuda_rng_state: _set_cpu_rng_state,
        clip_grads.clip_grad_by_total_norm_fp32: _clip_grad_by_total_norm_fp32,
        torch.optim.Adam: torch_view.optim.Adam,  # megatron's module-level fallback names
        torch.optim.AdamW: torch_view.optim.AdamW,
    }
    _originals.update(originals)
    _replacements.update({id(k): v for k, v in originals.items()})
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core"):
            _patch_module(module)
    sys.meta_path.insert(0, _PatchOnLoad())

    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_methods(
        LanguageModule.setup_embeddings_and_output_layer, cuda=_cuda_is_noop
    )
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for optimizer_class in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        optimizer_class.__init__ = _with_tensor_methods(optimizer_class.__init__, type=_type_names_cuda)
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    DynamicGradScaler.load_state_dict = _with_tensor_methods(  # fp16's loss scale, restored
        DynamicGradScaler.load_state_dict, cuda=_cuda_is_noop
    )

    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _installed = True
    logger.info("CPU mode: megatron-core runs on CPU with gloo")
