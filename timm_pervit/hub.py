""" Loading pretrained PerViT weights: bounded wait for the hub, and errors that say what went wrong and what to do

* ``pretrained_loading``: the context the model factory runs timm's pretrained loading in. Before the download it
  checks, within a bounded time (``TIMM_PERVIT_HUB_TIMEOUT``), that the hub answers, so an endpoint that accepts
  connections but never replies cannot stall ``create_model(..., pretrained=True)`` for many minutes in
  huggingface_hub's retries. Errors raised by timm's ``load_pretrained`` are translated by
  ``explain_pretrained_error``; every other error of model construction passes through untouched.
* ``PretrainedWeightsError``: the one exception for weights that cannot be loaded (repository missing on the hub,
  offline or unreachable without a cached copy, interrupted download, corrupted or unreadable file, a torch file
  refused for the pickled objects it holds, a path that is no checkpoint file), with the fix, including how to
  convert the official PerViT release and load it locally. Errors about a missing file, a refused pickle or a file
  that holds no state dict are also a ``FileNotFoundError`` or ``ValueError``.

This module imports nothing from the model code: it works with the repo ids and paths timm resolved.

Written for timm by the timm-pervit authors. Apache-2.0.
"""
import argparse
import contextlib
import logging
import os
import pickle
import time
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from huggingface_hub import constants as hf_constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
try:  # huggingface_hub >= 0.25 (earlier releases keep them in huggingface_hub.utils)
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)
except ImportError:
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)

from ._compat import HAS_LOCAL_DIR
from .paper import OFFICIAL_URL

__all__ = [
    'PretrainedWeightsError', 'PretrainedFileNotFoundError', 'InvalidCheckpointError', 'UnsafeCheckpointError',
    'explain_pretrained_error',
    'pretrained_loading', 'safe_file_overlay', 'wait_for_hub', 'hub_timeout', 'HUB_TIMEOUT_ENV', 'DEFAULT_HUB_TIMEOUT',
]

_logger = logging.getLogger(__name__)

#: Environment variable: the longest time in seconds to wait for the hub to answer before the weights download
#: (0 turns the check off and leaves the waiting to huggingface_hub).
HUB_TIMEOUT_ENV = 'TIMM_PERVIT_HUB_TIMEOUT'

#: Default of ``TIMM_PERVIT_HUB_TIMEOUT``: generous for a single small request, short next to huggingface_hub's own
#: retries (which, for a file that is not cached, wait far longer on an endpoint that never answers).
DEFAULT_HUB_TIMEOUT = 60.

#: Retries after a refused or failed connection (DNS hiccup, network coming up), within the same time budget.
_CONNECT_RETRIES = 3

#: File timm downloads first from a hub repo when the pretrained config names none.
_DEFAULT_HUB_FILENAME = 'model.safetensors'


class PretrainedWeightsError(RuntimeError):
    """Pretrained PerViT weights could not be loaded.

    Attributes:
        reason: One of 'not_published' (repository, revision or file missing on the hub), 'offline' (the hub is
            unreachable, does not answer in time, or ``HF_HUB_OFFLINE=1``, and no copy is cached), 'download_failed'
            (the transfer broke off; the message says whether a partial file stays cached), 'corrupted' (the
            weights file cannot be parsed), 'unsafe' (a local torch file that holds pickled objects weights-only
            loading does not allow; nothing in it ran), 'not_found' (a local path that does not exist or is a
            directory) or 'invalid' (a readable file that holds no state dict).
        source: Where timm looked for the weights (hub repo id or file path).
    """

    def __init__(self, message: str, reason: str, source: str):
        super().__init__(message)
        self.reason = reason
        self.source = source

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (str(self), self.reason, self.source)


class PretrainedFileNotFoundError(PretrainedWeightsError, FileNotFoundError):
    """The local weights path does not exist or is a directory (also a ``FileNotFoundError``, as timm raised)."""


class InvalidCheckpointError(PretrainedWeightsError, ValueError):
    """The local weights file is readable but holds no state dict (also a ``ValueError``, like the other content
    errors of the checkpoint filter)."""


class UnsafeCheckpointError(PretrainedWeightsError, ValueError):
    """The local torch file holds pickled objects that weights-only loading does not allow (nothing of it ran; also a
    ``ValueError``, as ``checkpoint_io.load_checkpoint`` raises for the same file)."""


class _Source(NamedTuple):
    """Where timm loads the weights from: load_from ('hf-hub', 'file', 'local-dir', 'url', ...) and location."""
    load_from: str
    location: str
    repo_id: str = ''
    revision: Optional[str] = None
    filename: Optional[str] = None


def _resolve_source(variant: str, pretrained_cfg: Any, overlay: Optional[Dict[str, Any]]) -> _Source:
    """The weights source timm resolves for ``variant`` with these factory arguments (best effort)."""
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
        load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    except Exception:  # only used to word messages and to decide on the hub check: never fail here
        return _Source('', '')
    if load_from != 'hf-hub':
        return _Source(load_from, str(loc) if isinstance(loc, (str, os.PathLike)) else '')
    hub_id, filename = (loc[0], loc[1]) if isinstance(loc, (tuple, list)) else (loc, None)
    repo_id, _, revision = str(hub_id).partition('@')
    return _Source(load_from, str(hub_id), repo_id, revision or None, filename)


def _how_to_convert(variant: str) -> str:
    tag = f'{variant}.in1k'
    return (
        f'To use the official PerViT release instead: download the {variant} checkpoint from {OFFICIAL_URL}, '
        f'convert it with `python -m timm_pervit convert <checkpoint.pth> --variant {variant} --output {tag} --verify` '
        f"and load the folder with timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{tag}/model.safetensors'))"
        + (f" or timm.create_model('local-dir:{tag}', pretrained=True)" if HAS_LOCAL_DIR else '')
        + '; the official .pth also loads as it is with pretrained_cfg_overlay=dict(file=<official.pth>).'
    )


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of an explicit (``raise ... from``) or implicit chain."""
    seen = {id(error)}
    while True:
        nxt = error.__cause__ or error.__context__
        if nxt is None or id(nxt) in seen:
            return error
        seen.add(id(nxt))
        error = nxt


def _brief(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of an exception, shortened."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ''
    first = first if len(first) <= limit else first[:limit] + '...'
    return f'{type(error).__name__}: {first}' if first else type(error).__name__


def _is_timeout(error: BaseException) -> bool:
    # requests (huggingface_hub < 1.0) and httpx/httpx2 (>= 1.0) name all their timeouts '...Timeout'
    return isinstance(error, TimeoutError) or 'Timeout' in type(error).__name__


def _is_network_error(error: BaseException) -> bool:
    """A failure to talk to the server at all (no HTTP answer): refused, DNS, reset, timeout."""
    if isinstance(error, HfHubHTTPError):
        return False  # the server answered with an HTTP error status
    library = type(error).__module__.split('.')[0]
    return isinstance(error, OSError) or library in ('httpx', 'httpx2', 'httpcore', 'httpcore2', 'requests', 'urllib3')


def _cache_summary(where: str) -> str:
    return f'no copy of {where} is in the Hugging Face cache ({hf_constants.HF_HUB_CACHE})'


def _drop_corrupted_cache(repo_id: str, revision: Optional[str], filename: str,
                          cache_dir: Optional[str] = None) -> Optional[str]:
    """Remove the cached revision holding a corrupted weights file of ``repo_id``; return its path."""
    cache_dir = str(cache_dir or hf_constants.HF_HUB_CACHE)
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return None
    commit = Path(cached).parent.name
    try:
        strategy = scan_cache_dir(cache_dir).delete_revisions(commit)
        strategy.execute()
    except Exception as e:  # never hide the original problem behind a cleanup failure
        _logger.warning(f'Could not remove the corrupted cached file {cached}: {e}')
        return None
    return cached


def _is_corrupted_file_error(error: BaseException) -> bool:
    from safetensors import SafetensorError
    if isinstance(error, (SafetensorError, EOFError)):
        return True
    msg = str(error)
    return isinstance(error, RuntimeError) and ('PytorchStreamReader' in msg or 'invalid load key' in msg)


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a pickle opening with the legacy magic number."""
    from .checkpoint_io import _LEGACY_TORCH_MAGIC
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        head = f.read(32)
    return head[:1] == b'\x80' and _LEGACY_TORCH_MAGIC in head


def _has_unsafe_globals(path: Path) -> bool:
    """True when torch finds pickled classes/functions beyond the weights-only allow-list (or cannot tell)."""
    import torch
    get_unsafe = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)  # torch >= 2.5
    if get_unsafe is None:
        return True  # cannot tell: keep timm's own refusal message
    try:
        unsafe = [g for g in get_unsafe(str(path)) if g != 'argparse.Namespace']
    except Exception:
        return False  # not even the pickle inside the archive can be listed: the file is damaged
    return bool(unsafe)


def _diagnose_file(variant: str, path: str) -> Optional[PretrainedWeightsError]:
    """Explain why a local weights file (``pretrained_cfg_overlay=dict(file=...)``) could not be loaded.

    Returns None when the file reads as a state dict (the error was about its content, e.g. from the checkpoint
    filter, and is best re-raised as it is) or when it is a zip checkpoint holding pickled code (timm's own refusal
    names the globals). A legacy (non-zip) or raw-pickle torch file holding disallowed globals gets an
    ``UnsafeCheckpointError`` naming them (torch's refusal of those reads like damage).
    """
    import torch
    from ._compat import safe_globals
    from .checkpoint_io import disallowed_globals, refused_pickle_message, state_dict_of

    p = Path(path)
    if p.is_dir():
        return PretrainedFileNotFoundError(
            f"Cannot load pretrained {variant} weights: {path} is a directory, not a weights file. Pass the weights "
            f"file in it, e.g. pretrained_cfg_overlay=dict(file='{p / 'model.safetensors'}'), or load a folder "
            f"written by save_for_hf / the converter with timm.create_model('local-dir:{path}', pretrained=True).",
            reason='not_found', source=path)
    if not p.exists():
        relative = '' if p.is_absolute() else f' (relative to the working directory {os.getcwd()})'
        return PretrainedFileNotFoundError(
            f'Cannot load pretrained {variant} weights: {path} does not exist{relative}. Check the path given as '
            f'pretrained_cfg_overlay=dict(file=...) (train.py: --pretrained-path). {_how_to_convert(variant)}',
            reason='not_found', source=path)
    unreadable = (
        f'The pretrained {variant} weights file {path} is corrupted or truncated, or not a PyTorch or safetensors '
        f'checkpoint at all, and cannot be read. Re-create it: download it again or re-run the converter '
        f'(python -m timm_pervit convert). {_how_to_convert(variant)}')
    if p.suffix == '.safetensors':
        from safetensors import safe_open
        try:
            with safe_open(str(p), framework='pt') as f:
                f.keys()
        except Exception:
            return PretrainedWeightsError(unreadable, reason='corrupted', source=path)
        return None

    def refused(unsafe: List[str]) -> UnsafeCheckpointError:
        subject = f'the pretrained {variant} weights file {path}'
        return UnsafeCheckpointError(
            f'{refused_pickle_message(path, unsafe, subject=subject, variant=variant)} {_how_to_convert(variant)}',
            reason='unsafe', source=path)

    if not _looks_like_torch_file(p):
        unsafe = disallowed_globals(p)  # a raw pickle.dump file: torch stops at its first opcodes
        return refused(unsafe) if unsafe else PretrainedWeightsError(unreadable, reason='corrupted', source=path)
    try:
        with safe_globals([argparse.Namespace]):
            checkpoint = torch.load(str(p), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(p):
            if _has_unsafe_globals(p):
                return None  # a real pickle with code in it: timm's refusal names the globals
            return PretrainedWeightsError(unreadable, reason='corrupted', source=path)
        unsafe = disallowed_globals(p, e)  # a legacy torch file
        return refused(unsafe) if unsafe else PretrainedWeightsError(unreadable, reason='corrupted', source=path)
    except Exception:
        return PretrainedWeightsError(unreadable, reason='corrupted', source=path)
    try:
        state_dict_of(checkpoint, str(p))
    except ValueError as e:
        return InvalidCheckpointError(
            f'Cannot load pretrained {variant} weights: {e} Point pretrained_cfg_overlay=dict(file=...) at a state '
            f'dict saved with torch.save(model.state_dict(), ...) or safetensors, or at a training checkpoint.',
            reason='invalid', source=path)
    return None


def explain_pretrained_error(
        variant: str,
        error: BaseException,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
) -> Optional[PretrainedWeightsError]:
    """Translate an error raised while loading pretrained PerViT weights into a ``PretrainedWeightsError``.

    Args:
        variant: Model variant being created, e.g. 'pervit_tiny'.
        error: The exception raised by timm / huggingface_hub / safetensors / torch while loading the weights.
        pretrained_cfg: The ``pretrained_cfg`` argument given to the model factory (tag, dict or None).
        pretrained_cfg_overlay: The ``pretrained_cfg_overlay`` argument given to the model factory.
        cache_dir: The ``cache_dir`` argument given to the model factory (default: the Hugging Face cache).

    Returns:
        The exception to raise instead, or None when ``error`` is not a weights loading problem this function knows
        (it is then best re-raised unchanged; e.g. a checkpoint of another variant already raises a ValueError
        naming that variant).
    """
    src = _resolve_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    if src.load_from == 'file':
        diagnosis = _diagnose_file(variant, src.location)
        if diagnosis is not None or not _is_corrupted_file_error(error):
            return diagnosis
    is_hub = src.load_from == 'hf-hub'
    where = f"'{src.location}' on {hf_constants.ENDPOINT}" if is_hub else repr(src.location or variant)
    fix = _how_to_convert(variant)

    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if hf_constants.HF_HUB_OFFLINE:
            return PretrainedWeightsError(
                f'Cannot load pretrained {variant} weights: HF_HUB_OFFLINE=1 is set and {_cache_summary(where)}. '
                f'Run once with a connection and without HF_HUB_OFFLINE to download them into the cache (later '
                f'offline runs use that copy), or load a local file. {fix}', reason='offline', source=src.location)
        cause = _root_cause(error)
        cause = f' ({_brief(cause)})' if cause is not error else ''
        return PretrainedWeightsError(
            f'Cannot load pretrained {variant} weights: the hub at {hf_constants.ENDPOINT} could not be '
            f'reached{cause} and {_cache_summary(where)}. Check the network connection (proxy settings, firewall, '
            f'HF_ENDPOINT) and retry: once downloaded, the weights are cached and also load offline. Or load a local '
            f'file. {fix}', reason='offline', source=src.location)
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)) \
            and not isinstance(error, GatedRepoError):
        kind = ('repository' if isinstance(error, RepositoryNotFoundError) else
                'revision' if isinstance(error, RevisionNotFoundError) else 'weights file')
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        status = f' (HTTP {status})' if status else ''
        return PretrainedWeightsError(
            f'No pretrained {variant} weights found: the {kind} {where} does not exist{status}. The converted '
            f'PerViT weights are only available once a maintainer has published them there with '
            f'`python -m timm_pervit convert ... --push-to-hub {src.repo_id or src.location}`. {fix}',
            reason='not_published', source=src.location)
    if _is_corrupted_file_error(error):
        removed = (_drop_corrupted_cache(src.repo_id, src.revision, src.filename or _DEFAULT_HUB_FILENAME, cache_dir)
                   if is_hub else None)
        cleanup = (f' The corrupted cached copy ({removed}) was removed, so the next call downloads it again.'
                   if removed else '')
        return PretrainedWeightsError(
            f'The pretrained {variant} weights file from {where} is corrupted or truncated and cannot be read '
            f'({_brief(error)}).{cleanup} If it is a local file, re-create it (re-download or re-run the converter). '
            f'{fix}', reason='corrupted', source=src.location)
    if isinstance(error, GatedRepoError):
        return None  # the hub's own message says how to get access
    if is_hub and (isinstance(error, OSError) or _is_network_error(error)) and not isinstance(error, FileNotFoundError):
        cache_root = cache_dir or hf_constants.HF_HUB_CACHE
        partial = _partial_downloads(cache_root, src.repo_id)
        # huggingface_hub < 1.18 keeps the broken transfer (``*.incomplete``) to resume it; newer releases drop it
        cached = (f'the partial download stays in the cache ({", ".join(map(str, partial))}); the next attempt '
                  f'resumes from it' if partial else f'nothing was written to the cache ({cache_root})')
        return PretrainedWeightsError(
            f'Downloading the pretrained {variant} weights from {where} failed ({_brief(error)}); {cached}. Retry '
            f'when the connection is stable. {fix}', reason='download_failed', source=src.location)
    return None


def _partial_downloads(cache_root: Union[str, os.PathLike], repo_id: Optional[str]) -> List[Path]:
    """Unfinished downloads (``*.incomplete`` blobs) of the model repo ``repo_id`` in the hub cache."""
    if not repo_id:
        return []
    blobs = Path(cache_root) / repo_folder_name(repo_id=repo_id, repo_type='model') / 'blobs'
    return sorted(blobs.glob('*.incomplete')) if blobs.is_dir() else []


def hub_timeout() -> float:
    """Seconds to wait for the hub before a weights download, from ``TIMM_PERVIT_HUB_TIMEOUT`` (0: no check)."""
    value = os.environ.get(HUB_TIMEOUT_ENV, '').strip()
    if not value:
        return DEFAULT_HUB_TIMEOUT
    try:
        return max(float(value), 0.)
    except ValueError:
        _logger.warning(f'{HUB_TIMEOUT_ENV}={value!r} is not a number of seconds; using {DEFAULT_HUB_TIMEOUT:g}')
        return DEFAULT_HUB_TIMEOUT


def _is_cached(repo_id: str, revision: Optional[str], filename: Optional[str], cache_dir: Optional[str]) -> bool:
    names = [filename] if filename else [_DEFAULT_HUB_FILENAME, 'pytorch_model.bin']
    for name in names:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision), str):
                return True
        except Exception:  # an unusual cache layout: let huggingface_hub decide
            return True
    return False


def wait_for_hub(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        timeout: Optional[float] = None,
) -> None:
    """Make sure the hub answers before timm downloads weights that are not cached, within ``timeout`` seconds.

    Without a cached copy, huggingface_hub retries an unanswered metadata request several times with long
    timeouts (for every candidate file name), so ``create_model(..., pretrained=True)`` could hang for many minutes
    on an endpoint that accepts connections but never replies. One metadata request with a deadline answers the
    question first. Does nothing for local weights, with ``HF_HUB_OFFLINE=1``, with a cached copy (huggingface_hub
    then falls back to it after one short request) or when ``timeout`` is 0.

    Args:
        variant: Model variant being created.
        pretrained_cfg: The factory's ``pretrained_cfg`` argument.
        pretrained_cfg_overlay: The factory's ``pretrained_cfg_overlay`` argument.
        cache_dir: The factory's ``cache_dir`` argument.
        timeout: Time budget in seconds (default: ``hub_timeout()``, i.e. ``TIMM_PERVIT_HUB_TIMEOUT`` or 60).

    Raises:
        PretrainedWeightsError: reason 'offline', when the hub cannot be reached or does not answer in time.
    """
    timeout = hub_timeout() if timeout is None else timeout
    if timeout <= 0 or hf_constants.HF_HUB_OFFLINE:
        return
    src = _resolve_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    if src.load_from != 'hf-hub' or not src.repo_id or _is_cached(src.repo_id, src.revision, src.filename, cache_dir):
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    url = hf_hub_url(src.repo_id, src.filename or _DEFAULT_HUB_FILENAME, revision=src.revision)
    deadline = time.monotonic() + timeout
    for attempt in range(_CONNECT_RETRIES + 1):
        remaining = deadline - time.monotonic()
        try:
            get_hf_file_metadata(url, timeout=max(remaining, 0.1))
            return
        except Exception as e:
            if not _is_network_error(e):
                return  # the hub answered (an HTTP error such as 404 is reported by timm's own request)
            failure = e
        if _is_timeout(failure):
            break
        pause = min(2. ** attempt, deadline - time.monotonic())
        if pause <= 0:
            break
        time.sleep(pause)
    where = f"'{src.location}' on {hf_constants.ENDPOINT}"
    if _is_timeout(failure):
        what = f'did not answer within {timeout:g} s ({_brief(failure)})'
    else:
        what = f'could not be reached ({_brief(failure)})'
    raise PretrainedWeightsError(
        f'Cannot load pretrained {variant} weights: the hub at {hf_constants.ENDPOINT} {what}, and '
        f'{_cache_summary(where)}. Check the network connection (proxy settings, firewall, HF_ENDPOINT) and retry, '
        f'or set {HUB_TIMEOUT_ENV} to wait longer than {timeout:g} s on a slow connection. Or load a local file. '
        f'{_how_to_convert(variant)}', reason='offline', source=src.location) from failure


def _raised_in_load_pretrained(error: BaseException) -> bool:
    """True when ``error`` was raised inside timm's ``load_pretrained`` (the loading step of the model builder), or
    in ``safe_file_overlay``, which reads the file in timm's place on timm releases that would unpickle it."""
    tb: Optional[TracebackType] = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name, module = frame.f_code.co_name, frame.f_globals.get('__name__', '')
        if (name == 'load_pretrained' and module.startswith('timm.')) or (
                name == 'safe_file_overlay' and module == __name__):
            return True
        tb = tb.tb_next
    return False


def _advises_unsafe_loading(error: BaseException) -> bool:
    seen = set()
    cur: Optional[BaseException] = error
    while cur is not None and id(cur) not in seen:
        if 'weights_only=False' in str(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def safe_file_overlay(overlay: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Keep timm from unpickling a local torch weights file without restriction.

    timm releases before the ``weights_only=True`` default read ``pretrained_cfg_overlay=dict(file=...)`` with a plain
    ``torch.load``. There the file is read here instead, through ``checkpoint_io.load_checkpoint`` (``weights_only``,
    ``argparse.Namespace`` allow-listed), and handed to timm as ``state_dict``; newer timm reads it itself.
    """
    from ._compat import timm_loads_files_weights_only
    file = (overlay or {}).get('file')
    if not file or str(file).endswith('.safetensors') or timm_loads_files_weights_only():
        return overlay
    from .checkpoint_io import load_checkpoint
    overlay = dict(overlay)
    overlay['state_dict'] = load_checkpoint(file)
    return overlay


@contextlib.contextmanager
def pretrained_loading(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
) -> Iterator[None]:
    """Run a model factory's ``build_model_with_cfg(..., pretrained=True)`` with bounded hub waiting and clear errors.

    Waits at most ``TIMM_PERVIT_HUB_TIMEOUT`` seconds for the hub (``wait_for_hub``), then runs the body; an error
    raised inside timm's ``load_pretrained`` that ``explain_pretrained_error`` recognizes is replaced by a
    ``PretrainedWeightsError``. Errors of the rest of model construction, and loading errors it does not know (e.g.
    a checkpoint of another variant), pass through unchanged.

    Args:
        variant: Model variant being created.
        pretrained_cfg: The factory's ``pretrained_cfg`` argument.
        pretrained_cfg_overlay: The factory's ``pretrained_cfg_overlay`` argument.
        cache_dir: The factory's ``cache_dir`` argument.
    """
    wait_for_hub(variant, pretrained_cfg, pretrained_cfg_overlay, cache_dir)
    try:
        yield
    except Exception as e:
        if not _raised_in_load_pretrained(e):
            raise
        error = explain_pretrained_error(variant, e, pretrained_cfg, pretrained_cfg_overlay, cache_dir)
        if error is None:
            raise
        if error.reason == 'corrupted' and _advises_unsafe_loading(e):
            # the original message suggests weights_only=False, i.e. unpickling a file that is not even a
            # checkpoint: do not print that advice under the explanation (it stays reachable as __context__)
            raise error from None
        raise error from e
