"""Version shims: one place for every API that differs between the timm, torch and huggingface_hub releases supported.

The package supports timm >= 1.0.9, torch >= 2.1 and huggingface_hub >= 0.23 (see ``pyproject.toml``). Where a
helper exists in the installed version it is used as is; where it is missing, a small equivalent stands in. Each
fallback names the release that introduced the real one, so it can be dropped when the floor moves past it.
"""
import inspect
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

import timm.layers

__all__ = [
    'calculate_drop_path_rates', 'get_device_dtype', 'is_compiling', 'is_fx_tracing', 'is_exporting',
    'autocast_dtype', 'checkpoint', 'build_mlp', 'safe_globals', 'HAS_SAFE_GLOBALS', 'timm_loads_files_weights_only',
]


def calculate_drop_path_rates(drop_path_rate: float, depth: int) -> List[float]:
    """Stochastic depth rate per block, rising linearly from 0 to ``drop_path_rate``."""
    fn = getattr(timm.layers, 'calculate_drop_path_rates', None)  # timm >= 1.0.21
    if fn is not None:
        return list(fn(drop_path_rate, depth))
    return [x.item() for x in torch.linspace(0, drop_path_rate, depth)] if depth > 1 else [0.] * depth


def get_device_dtype(module: nn.Module) -> Dict[str, Any]:
    """``{'device': ..., 'dtype': ...}`` of a module's parameters, for factory kwargs of new layers."""
    fn = getattr(timm.layers, 'get_device_dtype', None)  # timm >= 1.0.29
    if fn is not None:
        return dict(fn(module))
    p = next(module.parameters(), None)
    return {'device': None if p is None else p.device, 'dtype': None if p is None else p.dtype}


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the code."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):  # torch >= 2.3
        return compiler.is_compiling()
    from torch._dynamo import is_compiling as dynamo_is_compiling
    return dynamo_is_compiling()


def is_fx_tracing() -> bool:
    """True while torch.fx symbolic tracing runs (values are Proxies, data-dependent checks must be skipped)."""
    import torch.fx._symbolic_trace as st
    fn = getattr(st, 'is_fx_symbolic_tracing', None) or getattr(st, 'is_fx_tracing', None)  # 2.9 / earlier
    return bool(fn()) if fn is not None else False


def is_exporting() -> bool:
    """True while torch.jit.trace, torch.onnx or torch.export trace the model (no Python-side caching allowed)."""
    if torch.jit.is_tracing():
        return True
    onnx = getattr(torch, 'onnx', None)
    if onnx is not None and getattr(onnx, 'is_in_onnx_export', lambda: False)():
        return True
    compiler = getattr(torch, 'compiler', None)
    fn = getattr(compiler, 'is_exporting', None)  # torch >= 2.6
    return bool(fn()) if fn is not None else False


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    try:
        if _AUTOCAST_TAKES_DEVICE:  # torch >= 2.4 takes the device type
            return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if device_type == 'cpu':
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == 'cuda':
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    except RuntimeError:  # device types without autocast support (e.g. meta)
        pass
    return None


def _signature_params(fn: Callable) -> List[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature (torch < 2.4)
        return []


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled('cpu')
        return True
    except TypeError:
        return False


_AUTOCAST_TAKES_DEVICE = _autocast_takes_device()


def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Non-re-entrant activation checkpointing, identical on every timm and torch version.

    ``timm.models.checkpoint`` (timm >= 1.0.13) follows timm's ``use_reentrant`` default, which has changed across
    releases (and older timm re-exported torch's re-entrant default), so the choice is made explicit here.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def build_mlp(mlp_cls: Callable[..., nn.Module], *args: Any, device=None, dtype=None, **kwargs: Any) -> nn.Module:
    """Create a timm layer with factory kwargs; timm layers take ``device``/``dtype`` from timm 1.0.20 on."""
    if 'device' in _signature_params(mlp_cls.__init__):
        return mlp_cls(*args, device=device, dtype=dtype, **kwargs)
    if device is None and dtype is None:
        return mlp_cls(*args, **kwargs)
    with torch.device(device) if device is not None else _nullcontext():
        layer = mlp_cls(*args, **kwargs)
    return layer.to(dtype=dtype) if dtype is not None else layer


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


#: torch >= 2.5 can allow-list extra classes for ``torch.load(weights_only=True)`` within a context.
HAS_SAFE_GLOBALS = hasattr(torch.serialization, 'safe_globals')


def safe_globals(classes: List[type]) -> Any:
    """Context allow-listing ``classes`` for ``weights_only`` loading (a no-op where torch cannot do it)."""
    if HAS_SAFE_GLOBALS:
        return torch.serialization.safe_globals(classes)
    return _nullcontext()


def timm_loads_files_weights_only() -> bool:
    """Whether timm reads ``pretrained_cfg['file']`` torch files with ``weights_only=True`` (its default from 1.0.2x on;
    earlier releases unpickle them without restriction)."""
    from timm.models import load_state_dict
    param = inspect.signature(load_state_dict).parameters.get('weights_only')
    return param is not None and param.default is True
