"""PerViT (Peripheral Vision Transformer, NeurIPS 2022) as timm models.

Importing this package registers ``pervit_tiny``, ``pervit_small`` and ``pervit_medium`` with timm. Helpers that
registering does not need (``PretrainedWeightsError`` from ``timm_pervit.hub``, ``count_gmacs`` from
``timm_pervit.tools.flops``) are imported on first use, so the start-up hook that imports this package in every process
using timm stays as cheap as the models themselves.
"""
import importlib
import sys
from typing import Any

__version__ = '0.1.0'

__all__ = [
    'HF_HUB_NAMESPACE', 'MIN_INPUT_SIZE', 'PERVIT_VARIANTS', 'PerViT', 'PretrainedWeightsError', 'checkpoint_filter_fn',
    'count_gmacs', 'official_to_timm', 'timm_to_official', '__version__',
]

#: Public names imported from their submodule on first access: name -> submodule.
_LAZY = {'PretrainedWeightsError': 'hub', 'count_gmacs': 'tools.flops'}


def _running_command_line() -> bool:
    """True while ``python -m timm_pervit`` imports this package on its way to ``timm_pervit.__main__``.

    The interpreter imports a package before running its ``__main__``; for ``--help`` or a mistyped command, importing
    torch and timm here would cost seconds for nothing. ``__main__`` imports the models itself before it runs any
    command, so they are registered wherever they are used.
    """
    if sys.argv[:1] != ['-m']:  # argv[0] is '-m' only while the interpreter locates the module given with -m
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == '_get_module_details' and frame.f_globals.get('__name__') == 'runpy'
                and frame.f_locals.get('mod_name') == f'{__name__}.__main__'):
            return True
        frame = frame.f_back
    return False


if _running_command_line():
    _LAZY.update({  # the names of the imports below, from the same modules
        'HF_HUB_NAMESPACE': 'pervit', 'MIN_INPUT_SIZE': 'layers.inputs', 'PERVIT_VARIANTS': 'pervit', 'PerViT': 'pervit',
        'checkpoint_filter_fn': 'pervit', 'official_to_timm': 'keys', 'timm_to_official': 'keys'})
else:
    from .keys import official_to_timm, timm_to_official
    from .layers.inputs import MIN_INPUT_SIZE
    from .pervit import HF_HUB_NAMESPACE, PERVIT_VARIANTS, PerViT, checkpoint_filter_fn  # registers the models with timm


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'.{module}', __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
