"""Reading PerViT checkpoint files safely: the one loader used by the converter, the benchmark and the visualizer.

Official PerViT checkpoints are training checkpoints (``{'model': state_dict, 'optimizer': ..., 'epoch': ...,
'model_ema': ..., 'args': argparse.Namespace}``); timm's are ``{'state_dict': ..., ...}`` or bare state dicts; the
converted hub weights are safetensors. Torch files are read with ``weights_only=True`` and ``argparse.Namespace``
allow-listed, so no pickled code ever runs. A refused file is told apart from a damaged one by a static scan of its
pickle opcodes (``disallowed_globals``, nothing is imported or run), and a refusal names what it refused
(``refused_pickle_message``). ``check_floating_point`` refuses integer tensors for floating-point weights and
``check_finite`` NaN or Inf values (the checks behind ``checkpoint_filter_fn``, so timm's pretrained loading and the
converter say the same).
"""
import argparse
import io
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Set, Union

import torch

from timm.models import clean_state_dict

from ._compat import torch_load_weights_only

__all__ = [
    'load_checkpoint', 'state_dict_of', 'check_floating_point', 'check_finite', 'disallowed_globals',
    'refused_pickle_message', 'STATE_DICT_KEYS',
]

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
            no pickled code runs; the message names them and how to convert the file), cannot be read (truncated or
            corrupted), or holds no tensors.
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
            unsafe = disallowed_globals(path, e)
            if unsafe:
                raise ValueError(refused_pickle_message(path, unsafe)) from e
            raise ValueError(_unreadable(path, 'its pickled data cannot be parsed')) from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(_unreadable(path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
    return state_dict_of(checkpoint, str(path))


def _unreadable(path: Path, detail: str) -> str:
    return (f'Cannot read {path} as a torch checkpoint ({detail}); the file is truncated or corrupted. Download it '
            f'again or re-create it.')


#: The pickled magic number that opens a torch file of the legacy (non-zip) format.
_LEGACY_TORCH_MAGIC = (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')

#: Pickles at the start of a legacy torch file: magic number, protocol version, system info, the object, storage keys
#: (raw storage bytes follow, which are no pickle).
_LEGACY_PICKLES = 5

#: Opcodes pushing a string (the module and name of STACK_GLOBAL, protocol 4+).
_STRING_OPCODES = {
    'UNICODE', 'SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'STRING', 'BINSTRING', 'SHORT_BINSTRING'}
#: Opcodes that leave the stack as it is (a memo write or framing between a string and STACK_GLOBAL).
_NEUTRAL_OPCODES = {'PROTO', 'FRAME', 'MEMOIZE', 'PUT', 'BINPUT', 'LONG_BINPUT'}

#: A global as torch's weights-only unpickler (and this package's torch < 2.5 fallback) names it in a refusal.
_NAMED_GLOBAL = re.compile(r'(?:GLOBAL|the global) ([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)')


def _allowed_globals() -> Set[str]:
    """The globals ``torch.load(weights_only=True)`` resolves here: torch's own, the user's, argparse.Namespace."""
    allowed = {'argparse.Namespace'}
    try:
        from torch import _weights_only_unpickler as unpickler
        allowed.update(unpickler._get_allowed_globals())
        if hasattr(unpickler, '_get_user_allowed_globals'):  # torch >= 2.4
            allowed.update(unpickler._get_user_allowed_globals())
    except Exception:  # a torch without these private helpers: the globals of plain tensors
        allowed.update(
            ('collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_parameter'))
    return allowed


def _is_dotted_name(name: str) -> bool:
    parts = name.split('.')
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def _globals_in_pickle(stream: IO[bytes], found: List[str]) -> bool:
    """Append the globals one pickle in ``stream`` names to ``found`` (a static scan: nothing is imported or run).

    Returns:
        True when the pickle was read up to its STOP opcode; False when it is damaged or is no pickle (what was named
        before the damage stays in ``found``).
    """
    pushed: List[Optional[str]] = []  # what the recent opcodes pushed: a string, or None for anything else
    memo: Dict[int, Optional[str]] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ('GLOBAL', 'INST'):  # protocols 0-3: 'module name' in the opcode itself
                found.append(str(arg).replace(' ', '.', 1))
                pushed.append(None)
            elif name == 'STACK_GLOBAL':  # protocol 4+: module and name are the two strings pushed before it
                if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                    found.append(f'{pushed[-2]}.{pushed[-1]}')
                pushed.append(None)
            elif name in _STRING_OPCODES:
                pushed.append(arg if isinstance(arg, str) else arg.decode('latin-1'))
            elif name == 'MEMOIZE':
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                memo[arg] = pushed[-1] if pushed else None
            elif name in ('GET', 'BINGET', 'LONG_BINGET'):
                pushed.append(memo.get(arg))
            elif name not in _NEUTRAL_OPCODES:
                pushed.append(None)
            del pushed[:-2]
            if name == 'STOP':
                return True
    except Exception:  # damaged or no pickle at all
        return False
    return False


def disallowed_globals(path: PathLike, error: Optional[BaseException] = None) -> List[str]:
    """The classes and functions a torch file needs unpickled that ``weights_only`` loading does not allow.

    The pickles of the file (``data.pkl`` of a zip checkpoint; the leading pickles of a legacy
    ``_use_new_zipfile_serialization=False`` file; a raw ``pickle.dump`` file) are scanned opcode by opcode with
    ``pickletools``: nothing is imported or run. A damaged file yields what it names before the damage, random bytes
    yield nothing, so an empty list means "damaged or no pickle", not "refused".

    Args:
        path: The torch file.
        error: The ``pickle.UnpicklingError`` of the weights-only load, whose message may name the global it refused.

    Returns:
        The disallowed globals as ``module.name`` (e.g. 'posix.system' for ``os.system`` on Linux), in file order,
        without duplicates.
    """
    found: List[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith('.pkl'):
                        _globals_in_pickle(io.BytesIO(archive.read(member)), found)
        else:
            with open(path, 'rb') as f:
                legacy = _LEGACY_TORCH_MAGIC in f.read(32)
                f.seek(0)
                for _ in range(_LEGACY_PICKLES if legacy else 1):
                    if f.read(1) != b'\x80':  # every pickle torch or pickle.dump writes opens with PROTO
                        break
                    f.seek(-1, os.SEEK_CUR)
                    if not _globals_in_pickle(f, found):
                        break
    except Exception:  # unreadable: nothing named
        pass
    if error is not None:
        found.extend(_NAMED_GLOBAL.findall(str(error)))
    allowed = _allowed_globals()
    return list(dict.fromkeys(g for g in found if _is_dotted_name(g) and g not in allowed))


def refused_pickle_message(
        path: PathLike,
        unsafe: Sequence[str],
        subject: Optional[str] = None,
        variant: Optional[str] = None,
) -> str:
    """The error for a torch file refused because it needs disallowed globals unpickled (see ``disallowed_globals``).

    Args:
        path: The refused file.
        unsafe: The disallowed globals it names.
        subject: How the message calls the file (default: its path).
        variant: The PerViT variant it was meant for, if known (named in the converter command).

    Returns:
        A message naming the globals, saying that nothing ran and how to convert the file in a trusted environment.
    """
    names = ', '.join(unsafe[:8]) + (f' and {len(unsafe) - 8} more' if len(unsafe) > 8 else '')
    names = f' ({names})' if names else ''
    command = f'pervit-convert state_dict.pth{f" --variant {variant}" if variant else ""} --verify'
    folder = f'{variant}.in1k' if variant else '<variant>.in1k'
    load = (f'pickle.load(open({str(path)!r}, "rb"))' if _is_raw_pickle(path) else
            f'torch.load({str(path)!r}, weights_only=False)')
    return (
        f'Refused to load {subject or path}: it holds pickled objects that are not allowed to be unpickled{names}, '
        f'because unpickling them could run arbitrary code. Nothing in the file was executed. An official PerViT '
        f'checkpoint holds only tensors, numbers and an argparse.Namespace, so this file is not one, or was modified. '
        f'Only if you trust where it comes from, convert it in an environment you trust: load it there with {load}, '
        f'save just its weights with torch.save(checkpoint["model"], "state_dict.pth") (or the checkpoint itself if '
        f'it is a bare state dict), run `{command}` and load the converted {folder}/model.safetensors.')


def _is_raw_pickle(path: PathLike) -> bool:
    """A ``pickle.dump`` file (which ``torch.load`` cannot read at all): neither a zip nor a legacy torch file."""
    try:
        if zipfile.is_zipfile(path):
            return False
        with open(path, 'rb') as f:
            return _LEGACY_TORCH_MAGIC not in f.read(32)
    except OSError:
        return False


def check_floating_point(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Refuse integer (or bool, complex) checkpoint tensors for floating-point parameters and buffers of ``model``.

    ``load_state_dict`` would cast them silently (garbage logits; on a meta-device model with ``assign=True`` torch
    fails with "Only Tensors of floating point ... can require gradients"). Half precision (float16, bfloat16) is
    accepted, and so are integer buffers that are integers in the model (BatchNorm's ``num_batches_tracked``). Keys
    the model does not have are left to the loading itself.

    Args:
        state_dict: The checkpoint tensors, in the model's key layout.
        model: The model they are loaded into (its dtypes only; a meta-device model works).

    Raises:
        ValueError: Naming the first such tensor, its dtype and the model's (and how many more there are).
    """
    expected = model.state_dict()
    wrong = [(k, v.dtype, expected[k].dtype) for k, v in state_dict.items()
             if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
    if not wrong:
        return
    key, dtype, target = wrong[0]
    others = [k for k, _, _ in wrong[1:]]
    more = (f' (and {len(others)} more: {", ".join(others[:4])}{", ..." if len(others) > 4 else ""})'
            if others else '')
    raise ValueError(
        f"PerViT checkpoint tensor '{key}' is {dtype} but the model expects a floating-point tensor ({target})"
        f'{more}. Trained weights are floating point (float32, float16 or bfloat16); loaded as they are, these values '
        f'would be cast silently and give garbage outputs. The file was written by a tool that cast or quantized the '
        f'tensors: export the floating-point weights again, or convert the official checkpoint with '
        f'`pervit-convert <checkpoint.pth> --verify`.')


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse checkpoint tensors holding NaN or Inf values.

    Raises:
        ValueError: Naming how many such tensors there are and the first eight.
    """
    not_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ValueError(
            f'PerViT checkpoint holds NaN or Inf values in {len(not_finite)} tensor(s): '
            f'{", ".join(not_finite[:8])}{" ..." if len(not_finite) > 8 else ""}. The file is corrupted or comes from '
            f'a diverged training run; load an earlier checkpoint.')


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
