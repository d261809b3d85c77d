"""Reading PerViT checkpoint files safely: the one loader used by the converter, the benchmark and the visualizer.

Official PerViT checkpoints are training checkpoints (``{'model': state_dict, 'optimizer': ..., 'epoch': ...,
'model_ema': ..., 'args': argparse.Namespace}``); timm's are ``{'state_dict': ..., ...}`` or bare state dicts; the
converted hub weights are safetensors. Torch files are read with ``weights_only=True`` and ``argparse.Namespace``
allow-listed, so no pickled code ever runs.
"""
import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Union

import torch

from timm.models import clean_state_dict

from ._compat import torch_load_weights_only

__all__ = ['load_checkpoint', 'state_dict_of', 'STATE_DICT_KEYS']

PathLike = Union[str, os.PathLike]

#: Keys under which training checkpoints keep the model weights, in order of preference.
STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')


def load_checkpoint(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load the state dict of an official PerViT checkpoint (or any PerViT state dict file) safely.

    Args:
        path: A ``.pth``/``.pt``/``.bin``/``.tar`` torch file (training checkpoint with the weights under one of
            ``STATE_DICT_KEYS``, or a bare state dict) or a ``.safetensors`` file.

    Returns:
        The tensors of the state dict (non-tensor entries dropped, 'module.' prefixes removed).

    Raises:
        FileNotFoundError: ``path`` does not exist or is a directory.
        ValueError: The file needs pickled objects other than tensors/containers/argparse.Namespace (never loaded:
            no pickled code runs), cannot be read, or holds no tensors.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(
            f'Checkpoint {path} is a directory; pass the weights file in it (e.g. {path / "model.safetensors"}).')
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    if path.suffix == '.safetensors':
        import safetensors.torch
        try:
            checkpoint: Any = safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:
            raise ValueError(f'Cannot read {path} as safetensors ({e}); the file is truncated or not safetensors.')
    else:
        try:
            checkpoint = torch_load_weights_only(str(path), [argparse.Namespace])
        except pickle.UnpicklingError as e:
            raise ValueError(_refusal(path)) from e
        except (RuntimeError, EOFError) as e:
            raise ValueError(f'Cannot read {path} as a torch checkpoint ({e}); the file is truncated or corrupted.')
    return state_dict_of(checkpoint, str(path))


def _refusal(path: Path) -> str:
    unsafe = ''
    try:
        unsafe = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # torch < 2.5 cannot list them
        pass
    return (f'Refused to load {path}: it contains pickled objects that are not plain tensors or containers'
            f'{f" ({unsafe})" if unsafe else ""}, and loading them could run arbitrary code. An official PerViT '
            f'checkpoint only holds tensors, numbers and an argparse.Namespace, so this file is not one (or was '
            f'modified). Only if you fully trust it, re-save its state dict with torch.save(sd, ...) from a '
            f'trusted session and convert that.')


def state_dict_of(checkpoint: Any, name: str = 'the checkpoint') -> Dict[str, torch.Tensor]:
    """The tensors of a training checkpoint (weights under one of ``STATE_DICT_KEYS``) or of a bare state dict.

    Raises:
        ValueError: ``checkpoint`` is not a dict (e.g. a list or a tensor) or holds no tensors.
    """
    if isinstance(checkpoint, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f'{name} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint: expected a '
            f'PerViT state dict (name -> tensor) or {{"model": state_dict, ...}}.')
    state_dict = {k: v for k, v in clean_state_dict(checkpoint).items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(f'{name} holds no tensors: expected a PerViT state dict or {{"model": state_dict, ...}}.')
    return state_dict
