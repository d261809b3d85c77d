""" Metadata of PerViT weights folders: the hub model card (README.md) and a config.json that describes the weights

* ``model_card``: the README.md written next to weights converted from the official ImageNet-1k release, laid out
  like timm's own hub cards: metadata header, model details, usage (classification with the top-5 classes, feature
  maps, image embeddings; every snippet runs as written once the weights are published), a comparison of the
  released variants (measured params and GMACs, paper top-1) and citations.
* ``save_for_hf``: timm's ``save_for_hf`` (``model.safetensors`` + ``config.json``) with metadata that describes the
  weights actually saved. A model created from a PerViT architecture carries the default pretrained config of that
  architecture, i.e. the description of the ImageNet-1k release, whatever it was then trained on; this writes the
  caller's description, tag, labels and preprocessing instead, the same way on every supported timm release.

Written for timm by the timm-pervit authors. Apache-2.0.
"""
import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..paper import CITATION, OFFICIAL_URL, PAPER_NAME, PAPER_RESULTS, PAPER_URL, TIMM_CITATION
from ..pervit import HF_HUB_NAMESPACE, PERVIT_VARIANTS

__all__ = ['model_card', 'variant_stats', 'save_for_hf', 'IMAGE_URL', 'DATA_CONFIG_KEYS']

PathLike = Union[str, os.PathLike]

#: The example image of the usage snippets (the one timm's own model cards use).
IMAGE_URL = 'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'

#: Preprocessing keys of a timm pretrained config that ``save_for_hf`` takes from its ``data_config`` argument.
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')

#: Stride of the PerViT stem: the token grid is the image size / 16.
_STEM_STRIDE = 16


def variant_stats(img_size: int = 224) -> Dict[str, Tuple[int, float]]:
    """Params and GMACs per image of every released variant, measured on meta-device models (nothing allocated).

    Returns:
        {variant: (params, GMACs at ``img_size`` px)}; GMACs as ``timm_pervit.count_gmacs`` counts them
        (inference, position attention cached, attention matmuls included).
    """
    import timm
    from .flops import count_gmacs

    stats = {}
    for variant in PERVIT_VARIANTS:
        model = timm.create_model(variant, device='meta')
        stats[variant] = (sum(p.numel() for p in model.parameters()), count_gmacs(model, (3, img_size, img_size)))
    return stats


def _snippet_head(model_id: str, **create_kwargs: Any) -> str:
    kwargs = ''.join(f', {k}={v!r}' for k, v in create_kwargs.items())
    return f"""from urllib.request import urlopen

import timm
import torch
from PIL import Image

import timm_pervit  # registers the PerViT architectures with timm

img = Image.open(urlopen('{IMAGE_URL}')).convert('RGB')

model = timm.create_model('{model_id}', pretrained=True{kwargs}).eval()

# the preprocessing of the weights: resize, center crop, normalization
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
x = transform(img).unsqueeze(0)  # a batch of one image
"""


def _usage(model_id: str, variant: str, num_classes: int) -> str:
    import timm
    # what features_only returns, from the model itself (the last block of a stage already has the next width)
    channels = timm.create_model(variant, features_only=True, device='meta').feature_info.channels()
    num_features = PERVIT_VARIANTS[variant]['embed_dims'][-1]
    grid = 224 // _STEM_STRIDE
    if num_classes == 1000:
        top5 = """labels = timm.data.ImageNetInfo()  # ImageNet-1k class names
for p, i in zip(top5_prob[0].tolist(), top5_idx[0].tolist()):
    print(f'{labels.index_to_description(i)}: {100 * p:.1f}%')"""
    else:
        top5 = """for p, i in zip(top5_prob[0].tolist(), top5_idx[0].tolist()):
    print(f'class {i}: {100 * p:.1f}%')"""
    classify = _snippet_head(model_id) + f"""
with torch.no_grad():
    logits = model(x)
top5_prob, top5_idx = torch.topk(logits.softmax(dim=-1), k=5)
{top5}
"""
    shapes = ', '.join(f'(1, {c}, {grid}, {grid})' for c in channels)
    features = _snippet_head(model_id, features_only=True) + f"""
with torch.no_grad():
    feature_maps = model(x)
for fmap in feature_maps:
    print(tuple(fmap.shape))  # the output of every stage at 224 px: {shapes}
"""
    embed = _snippet_head(model_id, num_classes=0) + f"""
with torch.no_grad():
    embedding = model(x)  # num_classes=0: the pooled features, no classifier
    print(tuple(embedding.shape))  # (1, {num_features})

    # the same from the unpooled token map (works with any num_classes)
    tokens = model.forward_features(x)
    print(tuple(tokens.shape))  # (1, {grid}, {grid}, {num_features}): channels last
    embedding = model.forward_head(tokens, pre_logits=True)
"""
    return f"""## Model Usage
The PerViT architecture comes with the `timm-pervit` package: install it next to timm.

### Image Classification
```python
{classify}```

### Feature Map Extraction
```python
{features}```

### Image Embeddings
```python
{embed}```
"""


def _comparison(variant: str, stats: Dict[str, Tuple[int, float]]) -> str:
    rows = []
    for name, (params, gmacs) in stats.items():
        top1, _, paper_gflops = PAPER_RESULTS[name]
        tag = f'{name}.in1k'
        tag = f'**{tag}**' if name == variant else tag
        rows.append(f'| {tag} | {params / 1e6:.2f} | {gmacs:.3f} | {paper_gflops} | {top1} |')
    return '\n'.join([
        '## Model Comparison',
        'The released PerViT variants at 224 x 224. Params and GMACs are measured on the timm models '
        '(`timm_pervit.count_gmacs`: inference, position attention cached, attention matmuls included); the '
        'paper counts GFLOPs without the attention matmuls. Top-1 is the ImageNet-1k validation accuracy reported in '
        'the paper.',
        '',
        '| model | params (M) | GMACs | paper GFLOPs | top-1 (%) |',
        '|---|---:|---:|---:|---:|',
        *rows,
    ]) + '\n'


def model_card(
        variant: str,
        num_params: int,
        gmacs: Optional[float] = None,
        repo_id: Optional[str] = None,
        max_abs_diff: Optional[float] = None,
        num_classes: int = 1000,
        stats: Optional[Dict[str, Tuple[int, float]]] = None,
) -> str:
    """Write the README.md model card for PerViT weights converted from the official ImageNet-1k release.

    Args:
        variant: Model variant, e.g. 'pervit_tiny'.
        num_params: Parameter count of the converted model.
        gmacs: Measured GMACs at 224 px (inference, position attention cached), if known.
        repo_id: Hub repository the card is published to (default: the project's repo for the variant).
        max_abs_diff: Max abs logit difference to the official formula measured by the converter, if verified.
        num_classes: Classifier size of the weights.
        stats: Params and GMACs of every variant for the comparison table (default: ``variant_stats()``).

    Returns:
        The model card text (YAML metadata header + markdown body).
    """
    tag = f'{variant}.in1k'
    repo_id = repo_id or f'{HF_HUB_NAMESPACE}/{tag}'
    top1, paper_params, paper_gflops = PAPER_RESULTS[variant]
    stats = variant_stats() if stats is None else stats
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
            source_url=PAPER_URL,
        )],
    )
    gmacs_txt = f'{gmacs:.3f}' if gmacs is not None else 'n/a'
    verified = (f'\nThe converter checked the logits of these weights against the official checkpoint run through '
                f'the official attention formula: max abs difference {max_abs_diff:.2e}.\n'
                if max_abs_diff is not None else '')
    body = f"""
# Model card for {tag}

A PerViT image classification model ({PAPER_NAME}, Min et al., NeurIPS 2022), trained on ImageNet-1k at 224 px by
the paper's authors and converted from the official release ({OFFICIAL_URL}) to timm with `timm_pervit.tools.convert`.
In every attention block, PerViT multiplies the content attention of each head with a learned peripheral position
attention, a function of the distance between query and key, so that heads learn to look at regions from local to
global, like the fovea and periphery of human vision.
{verified}
## Model Details
- **Model Type:** Image classification / feature backbone
- **Model Stats:**
  - Params (M): {num_params / 1e6:.2f} ({num_params:,}; paper: {paper_params})
  - GMACs: {gmacs_txt} (224 x 224; paper: {paper_gflops} GFLOPs, attention matmuls not counted)
  - Image size: 224 x 224 (any size of at least 32 x 32 px works: the position attention follows the token grid)
  - Classes: {num_classes}
- **Dataset:** ImageNet-1k (top-1 {top1}% in the paper)
- **Papers:**
  - {PAPER_NAME}: {PAPER_URL}
- **Original:** {OFFICIAL_URL}

{_usage(repo_id if repo_id.startswith('hf-hub:') else f'hf-hub:{repo_id}', variant, num_classes)}
{_comparison(variant, stats)}
## Citation
```bibtex
{CITATION}
```
```bibtex
{TIMM_CITATION}
```
"""
    return ModelCard(f'---\n{data.to_yaml()}\n---\n{body}').content


def _timm_save_for_hf() -> Any:
    try:  # public in timm.models from timm 1.0.16
        from timm.models import save_for_hf as timm_save
    except ImportError:
        from timm.models._hub import save_for_hf as timm_save
    return timm_save


def save_for_hf(
        model: nn.Module,
        save_directory: PathLike,
        description: str,
        tag: Optional[str] = None,
        notes: Sequence[str] = (),
        origin_url: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save a PerViT model as a hub-ready folder whose config.json describes these weights.

    Writes ``model.safetensors`` and ``config.json`` with timm's ``save_for_hf`` (the folder loads with
    ``timm.create_model('local-dir:<folder>', pretrained=True)`` or from the hub with ``hf-hub:<repo id>``), then
    sets the metadata of the weights in the config's ``pretrained_cfg``: the given description, tag, notes and
    origin replace those of the architecture's default config (which describe the ImageNet-1k release), and
    ``data_config`` sets the preprocessing. ``model_args`` holds no ``num_classes``: timm reads the class count
    from the top-level ``num_classes``, and transformers' ``TimmWrapper`` passes it to ``timm.create_model`` itself
    next to ``**model_args`` (twice would be an error).

    Args:
        model: The model to save.
        save_directory: Output folder (created if needed).
        description: What these weights are: data, training, purpose.
        tag: Pretrained tag of the weights (e.g. 'in1k', 'my_dataset'); none when not given.
        notes: Free-form notes on the weights.
        origin_url: Where the weights come from (e.g. the training code or the original release).
        label_names: Name of each class, in classifier order.
        data_config: Preprocessing the weights expect (keys of ``DATA_CONFIG_KEYS``, e.g. input_size, mean, std).
        model_args: Architecture arguments needed to re-create the model (timm records those given to
            ``create_model`` from timm 1.0.31 on; pass them for older releases).

    Returns:
        The folder.
    """
    if label_names and len(label_names) != model.num_classes:
        raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes')
    unknown = set(data_config or {}) - set(DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(f'data_config keys {sorted(unknown)} are not preprocessing keys {DATA_CONFIG_KEYS}')
    folder = Path(save_directory)
    timm_save = _timm_save_for_hf()
    kwargs: Dict[str, Any] = {}
    if data_config and 'data_config' in inspect.signature(timm_save).parameters:  # timm >= 1.0.31
        kwargs['data_config'] = dict(data_config)
    timm_save(model, folder, model_args=dict(model_args) if model_args else None, safe_serialization=True, **kwargs)

    config_path = folder / 'config.json'
    config = json.loads(config_path.read_text())
    cfg = config.setdefault('pretrained_cfg', {})
    for key in ('tag', 'description', 'notes', 'origin_url', 'label_names', 'label_descriptions'):
        cfg.pop(key, None)  # describes the default weights of the architecture, not these
    cfg['description'] = description
    if tag:
        cfg['tag'] = tag
    if notes:
        cfg['notes'] = list(notes)
    if origin_url:
        cfg['origin_url'] = origin_url
    cfg['num_classes'] = config['num_classes'] = model.num_classes
    if data_config:
        size = data_config.get('input_size')
        if size is not None:  # the token grid the head pools at this size (the default config's is for 224 px)
            cfg['pool_size'] = [int(size[1]) // _STEM_STRIDE, int(size[2]) // _STEM_STRIDE]
        cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
    if label_names:
        config['label_names'] = list(label_names)
    else:
        config.pop('label_names', None)
    if 'model_args' in config:
        config['model_args'] = {k: v for k, v in config['model_args'].items() if k != 'num_classes'}
        if not config['model_args']:
            del config['model_args']
    config_path.write_text(json.dumps(config, indent=2))
    return folder
