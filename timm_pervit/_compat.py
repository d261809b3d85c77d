"""Version shims: one place for every API that differs between the timm, torch and huggingface_hub releases supported.

The package supports timm >= 1.0.9, torch >= 2.1 and huggingface_hub >= 0.23 (see ``pyproject.toml``). Where a
helper exists in the installed version it is used as is; where it is missing, a small equivalent stands in. Each
fallback names the release that introduced the real one, so it can be dropped when the floor moves past it.
"""
import dataclasses
import inspect
import json
import os
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx._symbolic_trace as _fx_trace
import torch.nn as nn
import torch.onnx

import timm
import timm.layers
from timm.models._pretrained import PretrainedCfg

__all__ = [
    'calculate_drop_path_rates', 'get_device_dtype', 'is_compiling', 'is_fx_tracing', 'is_exporting',
    'autocast_dtype', 'checkpoint', 'build_mlp', 'safe_globals', 'HAS_SAFE_GLOBALS', 'timm_loads_files_weights_only',
    'torch_load_weights_only', 'HAS_LOCAL_DIR', 'create_model_from_folder',
]


def calculate_drop_path_rates(drop_path_rate: float, depth: int) -> List[float]:
    """Stochastic depth rate per block, rising linearly from 0 to ``drop_path_rate``."""
    fn = getattr(timm.layers, 'calculate_drop_path_rates', None)  # timm >= 1.0.21
    if fn is not None:
        return list(fn(drop_path_rate, depth))
    return [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')] if depth > 1 else [0.] * depth


def _release(version: str) -> Tuple[int, ...]:
    """(major, minor, patch) of a version string such as '1.0.29.dev0' or '2.1.2+cu121'."""
    return tuple(int(x) for x in re.findall(r'\d+', version.split('+')[0])[:3])


#: timm >= 1.0.26 loads pretrained weights from a folder: ``timm.create_model('local-dir:<folder>', pretrained=True)``.
#: The prefix exists from timm 1.0.16, but up to 1.0.25 it reads ``model.safetensors`` with ``torch.load`` and fails.
HAS_LOCAL_DIR = _release(timm.__version__) >= (1, 0, 26)


#: timm >= 1.0.29 loads a hub file named ``*.safetensors`` (``hf_hub_filename``) with safetensors. Earlier releases
#: pass such a name to ``torch.load`` (unpickling error); they find ``model.safetensors`` only as the safe alternative
#: of the default ``pytorch_model.bin``, i.e. when no file name is configured (and without a name, timm also asks the
#: hub for ``pytorch_model.bin`` when ``model.safetensors`` is missing, hence the name where it can be given).
LOADS_SAFETENSORS_HUB_FILENAME = _release(timm.__version__) >= (1, 0, 29)


def create_model_from_folder(folder: Union[str, os.PathLike], **kwargs: Any) -> nn.Module:
    """``timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)`` on every timm.

    ``folder`` is written by timm's ``save_for_hf`` (``config.json`` and ``model.safetensors`` or
    ``pytorch_model.bin``). Where ``local-dir:`` does not work (``HAS_LOCAL_DIR``), the same steps run here: the
    architecture, model arguments and pretrained config come from ``config.json``, and the weights go through timm's
    pretrained path as ``pretrained_cfg['file']`` (so ``checkpoint_filter_fn`` and the head / input adaptation apply).
    """
    if HAS_LOCAL_DIR:
        return timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text())
    weights = [folder / name for name in ('model.safetensors', 'pytorch_model.bin') if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f'{folder} holds no model.safetensors or pytorch_model.bin')
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pretrained_cfg = {k: v for k, v in config.get('pretrained_cfg', {}).items() if k in fields}
    pretrained_cfg['file'] = str(weights[0])
    pretrained_cfg['num_classes'] = config.get('num_classes', pretrained_cfg.get('num_classes'))
    model_args = dict(config.get('model_args', {}), **kwargs)
    return timm.create_model(config['architecture'], pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)


def get_device_dtype(module: nn.Module) -> Dict[str, Any]:
    """``{'device': ..., 'dtype': ...}`` of a module's parameters, for factory kwargs of new layers."""
    fn = getattr(timm.layers, 'get_device_dtype', None)  # timm >= 1.0.29
    if fn is not None:
        return dict(fn(module))
    p = next(module.parameters(), None)
    return {'device': None if p is None else p.device, 'dtype': None if p is None else p.dtype}


# The tracing probes below are chosen once, at import: torch.compile calls them while it traces the model, and
# dynamo of torch < 2.3 cannot trace ``hasattr``/``getattr`` on a module (it graph-breaks, fatal with fullgraph=True).
_compiler = getattr(torch, 'compiler', None)
if hasattr(_compiler, 'is_compiling'):  # torch >= 2.3
    _is_compiling: Callable[[], bool] = _compiler.is_compiling
else:
    from torch._dynamo import is_compiling as _is_compiling

# torch >= 2.9 has is_fx_symbolic_tracing (False under dynamo) and deprecates is_fx_tracing
_is_fx_tracing: Callable[[], bool] = getattr(_fx_trace, 'is_fx_symbolic_tracing', None) or _fx_trace.is_fx_tracing
_is_onnx_exporting: Callable[[], bool] = getattr(torch.onnx, 'is_in_onnx_export', None) or (lambda: False)
_is_torch_exporting: Callable[[], bool] = getattr(_compiler, 'is_exporting', None) or (lambda: False)  # torch >= 2.6


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the code."""
    return bool(_is_compiling())


def is_fx_tracing() -> bool:
    """True while torch.fx symbolic tracing runs (values are Proxies, data-dependent checks must be skipped)."""
    return bool(_is_fx_tracing())


def is_exporting() -> bool:
    """True while torch.jit.trace, torch.onnx or torch.export trace the model (no Python-side caching allowed)."""
    return torch.jit.is_tracing() or bool(_is_onnx_exporting()) or bool(_is_torch_exporting())


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


def torch_load_weights_only(path: str, safe_classes: Sequence[type] = ()) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` that also accepts instances of ``safe_classes``.

    torch >= 2.5 allow-lists them with ``torch.serialization.safe_globals``. Older torch has no way to do that (its
    weights-only unpickler cannot even build plain objects), so where its weights-only load refuses the file, the file
    is read again with ``_RestrictedUnpickler``: the standard unpickler limited to the same globals plus
    ``safe_classes``. Either way no other class or function named in the file is ever imported or called.

    Raises:
        pickle.UnpicklingError: The file needs globals other than tensors, containers and ``safe_classes``.
    """
    if HAS_SAFE_GLOBALS:
        with torch.serialization.safe_globals(list(safe_classes)):
            return torch.load(path, map_location='cpu', weights_only=True)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        if not safe_classes:
            raise
    module = _restricted_pickle_module(safe_classes)
    # torch's own weights-only mode off: ``module`` restricts the globals instead. (Named, so that a traceback through
    # this line never reads like advice to load with the literal keyword set to False.)
    restricted_by_module = dict(weights_only=False)
    with warnings.catch_warnings():
        # torch 2.4 warns about every unrestricted-mode load; this one is restricted by ``module``
        warnings.filterwarnings('ignore', message='.*weights_only=False', category=FutureWarning)
        return torch.load(path, map_location='cpu', pickle_module=module, **restricted_by_module)


def _restricted_pickle_module(safe_classes: Sequence[type]) -> Any:
    """A ``pickle_module`` for ``torch.load`` whose unpickler only resolves torch's weights-only globals and
    ``safe_classes`` (fallback for ``torch.serialization.safe_globals``, torch 2.5)."""
    from torch import _weights_only_unpickler  # torch < 2.5: the allow-list of its weights-only load
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update({f'{c.__module__}.{c.__qualname__}': c for c in safe_classes})

    class _RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            obj = allowed.get(f'{module}.{name}')
            if obj is None:
                raise pickle.UnpicklingError(f'Refusing to load the global {module}.{name} (not allow-listed)')
            return obj

    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__='timm_pervit_restricted_pickle', Unpickler=_RestrictedUnpickler, load=load)
