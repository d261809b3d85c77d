""" Run the authors' PerViT code from a checkout, in-process, on the weights of a timm_pervit model

The official release (https://github.com/juhongm999/pervit) is not a package: its model lives in ``model/pervit.py``
(``VisionTransformer``), its variants in ``model/models.py`` (``pervit_tiny`` ...), and it is written for CUDA. This
module runs that code as its authors run it, from a checkout the user points at, without copying any of it:

* ``load_official_code(path)`` imports ``model/pervit.py`` and ``model/models.py`` from the checkout at run time.
  ``models.py`` registers ``pervit_tiny/small/medium`` in timm's registry, which would replace this package's
  models of the same names, so registration is switched off while it is imported; the checkout's top-level
  ``model`` package is taken out of ``sys.modules`` again afterwards (the imported modules stay usable).
* ``cuda_redirect(device)`` makes ``.cuda()`` / ``.to('cuda')`` land on ``device`` while the model is built (the
  official constructor puts its initialisation constants and its distance table on the GPU that way).
* ``build_official_model(code, model, mode)`` builds the matching variant, loads ``model``'s weights through
  ``timm_pervit.pervit.timm_to_official`` strictly, and prepares it the way the official scripts do: at inference
  ``init_rpe()`` computes every block's position attention once (``main.py`` calls it after loading weights for
  evaluation); in training nothing is stored, so the position attention is rebuilt every step.

The official code imports ``einops`` (and ``timm``); install it with ``pip install einops``.
"""
import contextlib
import importlib
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, Optional, Union

import torch
import torch.nn as nn

from ..pervit import PerViT, official_to_timm, timm_to_official
from .convert import infer_variant

__all__ = [
    'OfficialCode', 'OFFICIAL_DEPTHS', 'cuda_redirect', 'load_official_code', 'build_official_model',
    'official_token_grid', 'official_grads_to_timm',
]

_logger = logging.getLogger(__name__)

#: Blocks per stage: fixed in the official ``VisionTransformer``, so only models with these depths can be matched.
OFFICIAL_DEPTHS = (2, 2, 6, 2)

#: Top-level package name of the official model code (``<checkout>/model``).
_PACKAGE = 'model'


@dataclass
class OfficialCode:
    """The imported official model code of one checkout."""
    path: Path
    pervit: ModuleType  # model/pervit.py: VisionTransformer
    models: ModuleType  # model/models.py: the variant entry points


def _is_cuda(arg) -> bool:
    if isinstance(arg, str):
        return arg.startswith('cuda')
    return isinstance(arg, torch.device) and arg.type == 'cuda'


@contextlib.contextmanager
def cuda_redirect(device: Union[str, torch.device]) -> Iterator[None]:
    """Within the context, ``Tensor.cuda()``, ``Tensor.to('cuda'...)`` and ``Module.cuda()`` go to ``device``.

    Patches the methods on the classes for the duration of the context (not thread-safe: build the official model
    from one thread). Needed to construct the official model on a machine without CUDA, or on another device.
    """
    device = torch.device(device)
    tensor_cuda, tensor_to, module_cuda = torch.Tensor.cuda, torch.Tensor.to, nn.Module.cuda

    def _tensor_cuda(self, *args, **kwargs):
        return tensor_to(self, device, non_blocking=kwargs.get('non_blocking', False))

    def _tensor_to(self, *args, **kwargs):
        args = tuple(device if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get('device')):
            kwargs['device'] = device
        return tensor_to(self, *args, **kwargs)

    def _module_cuda(self, *args, **kwargs):
        return self.to(device)

    torch.Tensor.cuda, torch.Tensor.to, nn.Module.cuda = _tensor_cuda, _tensor_to, _module_cuda
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to, nn.Module.cuda = tensor_cuda, tensor_to, module_cuda


@contextlib.contextmanager
def _no_timm_registration() -> Iterator[None]:
    """``@register_model`` from any of timm's import paths returns the function unregistered."""
    import timm.models
    import timm.models._registry
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # timm.models.registry is a deprecated alias
        import timm.models.registry
    modules = (timm.models, timm.models._registry, timm.models.registry)
    saved = [m.register_model for m in modules]
    for m in modules:
        m.register_model = lambda fn: fn
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.register_model = fn


def _package_modules() -> Dict[str, ModuleType]:
    return {k: v for k, v in sys.modules.items() if k == _PACKAGE or k.startswith(_PACKAGE + '.')}


def load_official_code(path: Union[str, os.PathLike]) -> OfficialCode:
    """Import the model code of a checkout of the official PerViT repository.

    Args:
        path: The checkout's root (the folder holding ``model/pervit.py`` and ``model/models.py``).

    Returns:
        The imported modules.

    Raises:
        FileNotFoundError: ``path`` is not such a checkout.
        ImportError: A dependency of the official code is missing (named, with the pip command).
    """
    root = Path(path).expanduser().resolve()
    missing = [f for f in ('model/pervit.py', 'model/models.py') if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f'{root} is not a checkout of the official PerViT code (no {", ".join(missing)}): '
            f'git clone https://github.com/juhongm999/pervit and pass its folder.')
    # the code imports itself as the top-level package ``model`` (``from model.pervit import ...``): set aside any
    # other module of that name for the import, and put it back afterwards
    saved = _package_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        with _no_timm_registration(), warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # the code imports from timm's deprecated module paths
            pervit = importlib.import_module(f'{_PACKAGE}.pervit')
            models = importlib.import_module(f'{_PACKAGE}.models')
    except ImportError as e:
        if e.name and e.name.split('.')[0] != _PACKAGE:
            raise ImportError(
                f'The official PerViT code in {root} needs the package {e.name!r}: pip install {e.name}', name=e.name
            ) from e
        raise
    finally:
        sys.path.remove(str(root))
        for name in _package_modules():
            del sys.modules[name]
        sys.modules.update(saved)
    _logger.info('imported the official PerViT code from %s', root)
    return OfficialCode(root, pervit, models)


def _official_kwargs(state_dict: Dict[str, torch.Tensor], in_chans: int) -> Dict:
    """``VisionTransformer`` arguments for an official-layout state dict."""
    n_stem = sum(1 for k in state_dict if k.startswith('conv_layers.conv_layers.') and k.endswith('.0.weight'))
    stem = [state_dict[f'conv_layers.conv_layers.{i}.0.weight'].shape[0] for i in range(n_stem)]
    starts = [sum(OFFICIAL_DEPTHS[:i]) for i in range(len(OFFICIAL_DEPTHS))]
    return dict(
        num_heads=state_dict['rpe_proj.weight'].shape[0] // 4,
        emb_dims=[state_dict[f'blocks.{i}.norm1.weight'].shape[0] for i in starts],
        convstem_dims=[in_chans] + stem,
    )


def _cast_tensor_attributes(module: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """Move plain tensor attributes (not parameters or buffers, so ``Module.to`` skips them) like the weights."""
    for m in module.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor):
                setattr(m, name, value.to(device=device, dtype=dtype if value.is_floating_point() else None))


def build_official_model(
        code: OfficialCode,
        model: PerViT,
        mode: str = 'infer',
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The official ``VisionTransformer`` of ``model``'s variant holding ``model``'s weights, ready for ``mode``.

    The released variants are built with the official entry points of ``model/models.py``; other configurations
    (e.g. test models) with ``VisionTransformer`` and the arguments those entry points use.

    Args:
        code: The imported official code (``load_official_code``).
        model: The timm_pervit model whose weights to load (unchanged).
        mode: 'infer' (eval mode, ``init_rpe()`` called, as the official evaluation does) or 'train' (train mode,
            position attention rebuilt every forward).
        device: Device of the official model (default: ``model``'s).
        dtype: Floating-point dtype of the official model (default: ``model``'s).

    Returns:
        The official model.

    Raises:
        ValueError: ``model``'s architecture cannot be expressed by the official code.
        RuntimeError: The weights do not load strictly (the official code or the key conversion changed).
    """
    if mode not in ('infer', 'train'):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    ref_param = model.pos_attn.dist_proj.weight
    device = torch.device(device) if device is not None else ref_param.device
    dtype = dtype or ref_param.dtype
    state_dict = timm_to_official(model.state_dict())
    n_blocks = len(model.blocks)
    if n_blocks != sum(OFFICIAL_DEPTHS):
        raise ValueError(
            f'the official PerViT code builds {OFFICIAL_DEPTHS} blocks per stage, this model has {n_blocks} blocks')
    variant = infer_variant(model.state_dict())
    num_classes = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0
    with cuda_redirect(device):
        if variant is not None and hasattr(code.models, variant) and model.in_chans == 3:
            net = getattr(code.models, variant)(num_classes=num_classes)
        else:
            net = code.pervit.VisionTransformer(
                num_classes=num_classes, norm_layer=partial(nn.LayerNorm, eps=model.norm.eps),
                **_official_kwargs(state_dict, model.in_chans))
    net.load_state_dict(state_dict, strict=True)
    net.to(device=device, dtype=dtype)
    _cast_tensor_attributes(net, device, dtype)
    net.train(mode == 'train')
    if mode == 'infer':
        net.init_rpe()  # as the official main.py does after loading weights for evaluation
    return net


def official_token_grid(net: nn.Module) -> Optional[int]:
    """Side of the only token grid the official model accepts (its distance table is built for a fixed number of
    patches, 196 = 14 x 14: 224 x 224 input), or None if the model does not say."""
    n = getattr(net, 'num_patches', None)
    return math.isqrt(n) if isinstance(n, int) else None


def official_grads_to_timm(grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename gradients keyed by official parameter names to this implementation's parameter names."""
    return official_to_timm(grads)
