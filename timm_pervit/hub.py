""" Hugging Face Hub helpers for the PerViT pretrained weights

* ``PretrainedWeightsError`` and ``explain_pretrained_error``: turn the low-level errors of a failed
  ``create_model(..., pretrained=True)`` (repository missing on the hub, offline without a cached copy, interrupted
  download, corrupted weights file) into one exception that says what went wrong and how to fix it, including how to
  convert the official PerViT release and load it from a local file.
* ``model_card``: the README.md model card written next to the converted weights (metadata header for the hub,
  usage snippet, size and compute, paper results, citation).

Written for timm by the timm-pervit authors. Apache-2.0.
"""
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants as hf_constants, scan_cache_dir
from huggingface_hub import try_to_load_from_cache
try:  # huggingface_hub >= 0.25 (earlier releases keep them in huggingface_hub.utils)
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError)
except ImportError:
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError)

from ._compat import HAS_LOCAL_DIR
from .paper import CITATION, OFFICIAL_URL, PAPER_NAME, PAPER_RESULTS
from .pervit import HF_HUB_NAMESPACE

__all__ = ['PretrainedWeightsError', 'explain_pretrained_error', 'model_card', 'CITATION']

_logger = logging.getLogger(__name__)



class PretrainedWeightsError(RuntimeError):
    """Pretrained PerViT weights could not be loaded.

    Attributes:
        reason: One of 'not_published' (repository, revision or file missing on the hub), 'offline' (no connection
            or ``HF_HUB_OFFLINE=1`` and no cached copy), 'download_failed' (the transfer broke off; nothing was
            cached) or 'corrupted' (the weights file cannot be parsed).
        source: Where timm looked for the weights (hub repo id or file path).
    """

    def __init__(self, message: str, reason: str, source: str):
        super().__init__(message)
        self.reason = reason
        self.source = source


def _how_to_convert(variant: str) -> str:
    tag = f'{variant}.in1k'
    return (
        f'To use the official PerViT release instead: download the {variant} checkpoint from {OFFICIAL_URL}, '
        f'convert it with `python -m timm_pervit.convert <checkpoint.pth> --variant {variant} --output {tag} --verify` '
        f"and load the folder with timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{tag}/model.safetensors'))"
        + (f" or timm.create_model('local-dir:{tag}', pretrained=True)" if HAS_LOCAL_DIR else '')
        + f'; the official .pth also loads as it is with '
        f'pretrained_cfg_overlay=dict(file=<official.pth>).'
    )


def _resolve_source(variant: str, pretrained_cfg: Any, overlay: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    """(load_from, location) timm used for the weights of ``variant``: ('hf-hub', repo id), ('file', path), ..."""
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
        load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    except Exception:  # best effort: only used to word the message
        return '', ''
    if isinstance(loc, (tuple, list)):
        loc = '/'.join(str(x) for x in loc)
    return load_from, str(loc)


def _drop_corrupted_cache(repo_id: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """Remove the cached revision holding a corrupted ``model.safetensors`` of ``repo_id``; return its path."""
    from timm.models._hub import hf_split
    repo, revision = hf_split(repo_id)
    cache_dir = str(cache_dir or hf_constants.HF_HUB_CACHE)
    cached = try_to_load_from_cache(repo, 'model.safetensors', cache_dir=cache_dir, revision=revision)
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


def _partial_downloads(repo_id: str, cache_dir: Optional[str] = None) -> List[Path]:
    """The ``.incomplete`` blobs of ``repo_id`` in the cache: huggingface_hub < 1.18 keeps a broken download there
    (and resumes from it); later releases delete it."""
    from timm.models._hub import hf_split
    repo, _ = hf_split(repo_id)
    blobs = Path(cache_dir or hf_constants.HF_HUB_CACHE) / f'models--{repo.replace("/", "--")}' / 'blobs'
    return sorted(blobs.glob('*.incomplete')) if blobs.is_dir() else []


def _is_corrupted_file_error(error: BaseException) -> bool:
    from safetensors import SafetensorError
    if isinstance(error, (SafetensorError, EOFError)):
        return True
    msg = str(error)
    return isinstance(error, RuntimeError) and ('PytorchStreamReader' in msg or 'invalid load key' in msg)


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
        error: The exception raised by timm / huggingface_hub / safetensors.
        pretrained_cfg: The ``pretrained_cfg`` argument given to the model factory (tag, dict or None).
        pretrained_cfg_overlay: The ``pretrained_cfg_overlay`` argument given to the model factory.
        cache_dir: The ``cache_dir`` argument given to the model factory (default: the Hugging Face cache).

    Returns:
        The exception to raise instead (chain it with ``from error``), or None when ``error`` is not a weights loading
        problem this function knows (it is then best re-raised unchanged; e.g. a checkpoint of another variant
        already raises a ValueError naming that variant).
    """
    load_from, source = _resolve_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    is_hub = load_from == 'hf-hub'
    where = f"'{source}' on {hf_constants.ENDPOINT}" if is_hub else repr(source or variant)
    fix = _how_to_convert(variant)

    if isinstance(error, LocalEntryNotFoundError) or isinstance(error, OfflineModeIsEnabled):
        offline = hf_constants.HF_HUB_OFFLINE
        why = ('HF_HUB_OFFLINE=1 is set' if offline else f'the hub at {hf_constants.ENDPOINT} could not be reached')
        return PretrainedWeightsError(
            f'Cannot load pretrained {variant} weights: {why} and no copy of {where} is in the Hugging Face cache '
            f'({hf_constants.HF_HUB_CACHE}). Connect once (unset HF_HUB_OFFLINE) to download and cache them, or load '
            f'a local file. {fix}', reason='offline', source=source)
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)) \
            and not isinstance(error, GatedRepoError):
        kind = ('repository' if isinstance(error, RepositoryNotFoundError) else
                'revision' if isinstance(error, RevisionNotFoundError) else 'weights file')
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        status = f' (HTTP {status})' if status else ''
        return PretrainedWeightsError(
            f'No pretrained {variant} weights found: the {kind} {where} does not exist{status}. The converted '
            f'PerViT weights are only available once a maintainer has published them there with '
            f'`python -m timm_pervit.convert ... --push-to-hub {HF_HUB_NAMESPACE}/{variant}.in1k`. {fix}',
            reason='not_published', source=source)
    if _is_corrupted_file_error(error):
        removed = _drop_corrupted_cache(source, cache_dir) if is_hub else None
        cleanup = (f' The corrupted cached copy ({removed}) was removed, so the next call downloads it again.'
                   if removed else '')
        return PretrainedWeightsError(
            f'The pretrained {variant} weights file from {where} is corrupted or truncated and cannot be read '
            f'({type(error).__name__}: {error}).{cleanup} If it is a local file, re-create it (re-download or '
            f're-run the converter). {fix}', reason='corrupted', source=source)
    if is_hub and (isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
                   or type(error).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore')):
        partial = _partial_downloads(source, cache_dir)
        written = (f'the partial download stays in the cache ({partial[0]}) and the next attempt resumes it'
                   if partial else f'nothing was written to the cache ({cache_dir or hf_constants.HF_HUB_CACHE})')
        return PretrainedWeightsError(
            f'Downloading the pretrained {variant} weights from {where} failed ({type(error).__name__}: {error}); '
            f'{written}. Retry when the connection is stable. {fix}', reason='download_failed', source=source)
    return None


def model_card(
        variant: str,
        num_params: int,
        gmacs: Optional[float] = None,
        repo_id: Optional[str] = None,
        max_abs_diff: Optional[float] = None,
        num_classes: int = 1000,
) -> str:
    """Write the README.md model card for converted PerViT weights.

    Args:
        variant: Model variant, e.g. 'pervit_tiny'.
        num_params: Parameter count of the converted model.
        gmacs: Measured GMACs at 224 px (inference, position attention cached), if known.
        repo_id: Hub repository the card is published to (default: the project's repo for the variant).
        max_abs_diff: Max abs logit difference to the official formula measured by the converter, if verified.
        num_classes: Classifier size of the weights.

    Returns:
        The model card text (YAML metadata header + markdown body).
    """
    tag = f'{variant}.in1k'
    repo_id = repo_id or f'{HF_HUB_NAMESPACE}/{tag}'
    top1, paper_params, paper_gflops = PAPER_RESULTS[variant]
    data = ModelCardData(
        library_name='timm',
        license='apache-2.0',
        tags=['image-classification', 'timm', 'pervit', 'vision-transformer'],
        datasets=['imagenet-1k'],
        metrics=['accuracy'],
        pipeline_tag='image-classification',
        model_name=repo_id,
        eval_results=[EvalResult(
            task_type='image-classification',
            dataset_type='imagenet-1k',
            dataset_name='ImageNet-1k (val, 224 px)',
            metric_type='accuracy',
            metric_name='top-1 accuracy',
            metric_value=top1,
            source_name=f'{PAPER_NAME} (paper)',
            source_url='https://arxiv.org/abs/2206.06801',
        )],
    )
    gmacs_txt = f'{gmacs:.3f}' if gmacs is not None else 'n/a'
    verified = (f'The converter checked the logits of these weights against the official checkpoint computed with '
                f'the official attention formula: max abs difference {max_abs_diff:.2e}.\n'
                if max_abs_diff is not None else '')
    body = f"""
# Model card for {tag}

PerViT ({PAPER_NAME}, Min et al., NeurIPS 2022) image classifier trained on ImageNet-1k at 224 px by the paper's
authors; weights converted from the official release ({OFFICIAL_URL}) to the timm-pervit implementation
with `timm_pervit.convert`.
{verified}
## Model details
- **Model type:** image classification / feature backbone
- **Params (M):** {num_params / 1e6:.3f} ({num_params:,})
- **GMACs @224:** {gmacs_txt} (`torch.utils.flop_counter`, inference, position attention cached; the paper reports
  {paper_gflops} GFLOPs without the attention matmuls)
- **Classes:** {num_classes}
- **Image size:** 224 x 224 (any size >= 32 px works)
- **ImageNet-1k top-1 (paper):** {top1}% (paper: {paper_params}M params)
- **Dataset:** ImageNet-1k
- **Papers:** {PAPER_NAME}, https://arxiv.org/abs/2206.06801
- **Original:** {OFFICIAL_URL}

## Model usage
```python
import timm, torch
import timm_pervit  # the timm-pervit package: registers the PerViT models with timm

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)
# img: a PIL image
# probs = model(transform(img).unsqueeze(0)).softmax(-1)
```

## Citation
```bibtex
{CITATION}
```
"""
    return ModelCard(f'---\n{data.to_yaml()}\n---\n{body}').content
