""" Convert the official PerViT release to hub-ready timm weights, verify and publish them

```bash
python -m timm_pervit convert pervit_tiny.pth --verify              # -> ./pervit_tiny.in1k/ (also: pervit-convert)
python -m timm_pervit convert pervit_tiny.pth --verify --push-to-hub timm-pervit/pervit_tiny.in1k
```

The input is an official PerViT checkpoint as released (``{'model': state_dict, 'optimizer': ..., 'epoch': ...,
'model_ema': ..., 'args': argparse.Namespace}``), a bare state dict (official or timm key layout) or a safetensors
file. It is loaded with ``weights_only=True`` (only tensors, containers and ``argparse.Namespace`` are accepted, so
no pickled code ever runs), the variant is taken from ``--variant`` or inferred from the tensor shapes, the weights
are converted with ``checkpoint_filter_fn`` and loaded strictly into the timm model. The output folder holds
``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``) and a ``README.md`` model card; it is written to a
temporary folder and moved into place only when everything (including ``--verify``) succeeded.

``--verify`` reloads the written files through timm's pretrained loading (``pretrained_cfg_overlay=dict(file=...)``,
fused attention) and compares its logits with the original checkpoint run through the official attention formula
(``fused_attn=False`` in every block, weights from the raw official dict).

Written for timm by the timm-pervit authors. Apache-2.0.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

import timm

from ..checkpoint_io import load_checkpoint, state_dict_of
from ..pervit import HF_HUB_NAMESPACE, PERVIT_VARIANTS, checkpoint_filter_fn, is_official_layout, official_to_timm
from .flops import count_gmacs
from .model_card import model_card, save_for_hf
from .progress import add_progress_arguments, resolve_mode

__all__ = [
    'ConversionResult', 'load_checkpoint', 'infer_variant', 'convert_checkpoint', 'verify_folder', 'push_folder',
    'main',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass
class ConversionResult:
    """What ``convert_checkpoint`` produced."""
    variant: str
    output_dir: Path
    num_params: int
    num_classes: int
    gmacs: Optional[float] = None
    max_abs_diff: Optional[float] = None
    repo_url: Optional[str] = None

    def summary(self) -> str:
        diff = f'{self.max_abs_diff:.3e}' if self.max_abs_diff is not None else 'not verified (use --verify)'
        gmacs = f'{self.gmacs:.3f}' if self.gmacs is not None else 'n/a'
        line = (f'variant={self.variant} params={self.num_params:,} gmacs={gmacs} max_logit_diff={diff} '
                f'output={self.output_dir}')
        return line + (f' published={self.repo_url}' if self.repo_url else '')


def infer_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Name the released variant whose architecture matches a (timm-layout or official) state dict, if any."""
    if is_official_layout(state_dict):
        state_dict = official_to_timm(state_dict)
    for name, arch in PERVIT_VARIANTS.items():
        heads = arch['num_heads']
        dims = arch['embed_dims']
        if (state_dict.get('pos_attn.dist_proj.weight', torch.empty(0)).shape == (4 * heads, 1)
                and state_dict.get('blocks.0.attn.qkv.weight', torch.empty(0)).shape == (3 * dims[0], dims[0])
                and state_dict.get('norm.weight', torch.empty(0)).shape == (dims[-1],)
                and state_dict.get('stem.0.conv.weight', torch.empty(0)).shape[:1] == (arch['stem_dims'][0],)):
            return name
    return None



def _save_for_hf(model: torch.nn.Module, folder: Path, variant: str) -> None:
    """``model.safetensors`` + ``config.json`` describing the official ImageNet-1k weights of ``variant``."""
    cfg = timm.models.get_pretrained_cfg(f'{variant}.in1k')
    save_for_hf(model, folder, description=cfg.description, tag=cfg.tag, notes=cfg.notes, origin_url=cfg.origin_url)


def _empty_model(variant: str, **kwargs: Any) -> torch.nn.Module:
    """The timm model without its (slow, immediately overwritten) random init: parameters on the meta device."""
    return timm.create_model(variant, device='meta', **kwargs)


def _load_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load a state dict (converted by ``checkpoint_filter_fn``) strictly into a meta-device model, as float32."""
    state_dict = {
        k: (v.float() if v.is_floating_point() else v).contiguous()
        for k, v in checkpoint_filter_fn(state_dict, model).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _reference_logits(state_dict: Dict[str, torch.Tensor], variant: str, num_classes: int,
                      x: torch.Tensor) -> torch.Tensor:
    """Logits of the raw (official) state dict through the explicit official attention formula."""
    ref = _load_strict(_empty_model(variant, num_classes=num_classes), state_dict)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        return ref.eval()(x)


def verify_folder(
        folder: PathLike,
        state_dict: Dict[str, torch.Tensor],
        variant: str,
        batch_size: int = 2,
        img_size: int = 224,
        seed: int = 0,
) -> float:
    """Max abs logit difference between a converted folder (loaded by timm, fused attention) and the original
    checkpoint run through the official formula, on seeded random images."""
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    # timm's pretrained path with the written files (what `local-dir:` does on timm >= 1.0.26, on every timm)
    config = json.loads((Path(folder) / 'config.json').read_text())
    model = timm.create_model(
        config['architecture'], pretrained=True, num_classes=config['num_classes'],
        pretrained_cfg_overlay=dict(file=str(Path(folder) / 'model.safetensors'))).eval()
    with torch.no_grad():
        out = model(x)
    ref = _reference_logits(state_dict, variant, model.num_classes, x)
    return (out.double() - ref.double()).abs().max().item()


def _get_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token
    token = token or get_token()
    if not token:
        raise RuntimeError(
            'No Hugging Face token found, so nothing can be published: run `hf auth login` (or set the HF_TOKEN '
            'environment variable) with a token that has write access to the target namespace, then retry.')
    return token


def push_folder(
        folder: PathLike,
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: str = 'Add PerViT weights converted from the official release',
) -> str:
    """Publish a converted folder to the Hugging Face Hub (creates the model repo if needed).

    Returns:
        The URL of the commit.

    Raises:
        RuntimeError: No token (``hf auth login`` / ``HF_TOKEN``).
    """
    from huggingface_hub import HfApi
    api = HfApi(token=_get_token(token), library_name='timm', library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


def convert_checkpoint(
        checkpoint: Union[PathLike, Dict[str, torch.Tensor]],
        output_dir: Optional[PathLike] = None,
        variant: Optional[str] = None,
        verify: bool = False,
        tolerance: float = 1e-4,
        overwrite: bool = False,
        push_to_hub: Optional[str] = None,
        token: Optional[str] = None,
        private: bool = False,
) -> ConversionResult:
    """Convert an official PerViT checkpoint into a hub-ready folder, optionally verify and publish it.

    Args:
        checkpoint: Path of the checkpoint (see ``load_checkpoint``) or an already loaded checkpoint / state dict.
        output_dir: Output folder (default: ``./<variant>.in1k``). Must not exist or be empty unless ``overwrite``.
        variant: 'pervit_tiny', 'pervit_small' or 'pervit_medium'; inferred from the tensor shapes if None.
        verify: Compare the written folder's logits with the official formula on the original weights.
        tolerance: Largest accepted max abs logit difference for ``verify``.
        overwrite: Replace an existing non-empty ``output_dir``.
        push_to_hub: Hub repo id to publish the folder to, e.g. 'timm-pervit/pervit_tiny.in1k'.
        token: Hub token (default: ``HF_TOKEN`` / ``hf auth login``).
        private: Create the hub repo as private.

    Returns:
        A ``ConversionResult`` (its ``summary()`` is the CLI's summary line).

    Raises:
        ValueError: Unknown variant, shapes that fit no / another variant (naming the look-alike and the
            mismatching keys), verification above ``tolerance``, unsafe or unreadable checkpoint.
        FileExistsError: ``output_dir`` is a file, or not empty and ``overwrite`` is False.
    """
    if push_to_hub:
        token = _get_token(token)  # fail before the work, not after it
    if isinstance(checkpoint, dict):
        state_dict = state_dict_of(checkpoint)
    else:
        _logger.info(f'Loading {checkpoint} (weights_only=True)')
        state_dict = load_checkpoint(checkpoint)
    if variant is None:
        variant = infer_variant(state_dict)
        if variant is None:
            shapes = {k: tuple(state_dict[k].shape) for k in ('rpe_proj.weight', 'pos_attn.dist_proj.weight',
                                                               'norm.weight') if k in state_dict}
            raise ValueError(
                f'Cannot infer the PerViT variant: the checkpoint matches none of {sorted(PERVIT_VARIANTS)} '
                f'(shapes {shapes}). Pass --variant if it is one of them, or check the file.')
        _logger.info(f'Inferred variant {variant} from the tensor shapes')
    elif variant not in PERVIT_VARIANTS:
        raise ValueError(f'Unknown variant {variant!r}; choose one of {sorted(PERVIT_VARIANTS)}.')
    output_dir = Path(output_dir if output_dir is not None else f'{variant}.in1k')
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(
            f'Output path {output_dir} is an existing file, not a folder; give a folder path (it is created) or move '
            f'the file away. --overwrite only replaces folders.')
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'Output folder {output_dir} is not empty; choose another one or pass --overwrite.')

    head = state_dict.get('head.weight')
    num_classes = head.shape[0] if head is not None else 1000
    _logger.info(f'Converting to the timm layout and loading strictly into {variant}')
    model = _load_strict(_empty_model(variant, num_classes=num_classes), state_dict).eval()
    num_params = sum(p.numel() for p in model.parameters())
    gmacs = count_gmacs(_empty_model(variant, num_classes=num_classes))  # shapes only, on the meta device

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f'.{output_dir.name}.{uuid.uuid4().hex[:8]}.partial'
    tmp_dir.mkdir()
    try:
        _logger.info(f'Writing model.safetensors, config.json and README.md to {tmp_dir}')
        _save_for_hf(model, tmp_dir, variant)
        # safetensors writes the weights owner-only; give them the permissions of the other files
        os.chmod(tmp_dir / 'model.safetensors', (tmp_dir / 'config.json').stat().st_mode & 0o777)
        max_abs_diff = None
        if verify:
            _logger.info('Verifying the written folder against the official formula')
            max_abs_diff = verify_folder(tmp_dir, state_dict, variant)
            if not max_abs_diff <= tolerance:
                raise ValueError(
                    f'Verification failed: the converted {variant} logits differ from the official checkpoint by '
                    f'{max_abs_diff:.3e} > {tolerance:g}; nothing was written.')
        card = model_card(variant, num_params, gmacs=gmacs, repo_id=push_to_hub, max_abs_diff=max_abs_diff,
                          num_classes=num_classes)
        (tmp_dir / 'README.md').write_text(card, encoding='utf-8')
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result = ConversionResult(variant, output_dir, num_params, num_classes, gmacs=gmacs, max_abs_diff=max_abs_diff)
    if push_to_hub:
        default_repo = f'{HF_HUB_NAMESPACE}/{variant}.in1k'
        if push_to_hub != default_repo:
            _logger.warning(f"{push_to_hub} is not {default_repo}, where create_model('{variant}', pretrained=True) "
                            f"looks; load it with create_model('hf-hub:{push_to_hub}', pretrained=True).")
        _logger.info(f'Publishing {output_dir} to {push_to_hub}')
        result.repo_url = push_folder(output_dir, push_to_hub, token=token, private=private)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='pervit-convert',
        description='Convert an official PerViT checkpoint to a hub-ready timm folder (model.safetensors, '
                    'config.json, README.md), optionally verify it and publish it to the Hugging Face Hub.')
    parser.add_argument('checkpoint', help='official checkpoint (.pth with "model", or a bare state dict; '
                                           'or .safetensors)')
    parser.add_argument('--variant', choices=sorted(PERVIT_VARIANTS), default=None,
                        help='model variant (default: inferred from the tensor shapes)')
    parser.add_argument('-o', '--output', default=None, help='output folder (default: ./<variant>.in1k)')
    parser.add_argument('--verify', action='store_true',
                        help='compare the converted logits with the official formula on the original weights')
    parser.add_argument('--tolerance', type=float, default=1e-4, help='max abs logit difference for --verify')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty output folder')
    parser.add_argument('--push-to-hub', metavar='REPO_ID', default=None,
                        help=f'publish the folder to this hub repo, e.g. {HF_HUB_NAMESPACE}/pervit_tiny.in1k '
                             '(token from HF_TOKEN or `hf auth login`)')
    parser.add_argument('--private', action='store_true', help='create the hub repo as private')
    parser.add_argument('-q', '--quiet', action='store_true', help='only print the summary line')
    add_progress_arguments(parser, help='--push-to-hub: auto shows huggingface_hub\'s upload bars on a terminal '
                                        'only; bar: always; log, off: never (default: %(default)s)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point (``pervit-convert`` / ``python -m timm_pervit convert``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format='%(message)s')
    if args.push_to_hub and resolve_mode(args.progress) != 'bar':
        # the converter has no bars of its own; huggingface_hub's upload bars would fill a log file with frames
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        result = convert_checkpoint(
            args.checkpoint,
            output_dir=args.output,
            variant=args.variant,
            verify=args.verify,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing input, output in the way, no permission
        print(f'pervit-convert: error: {e}', file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == '__main__':
    sys.exit(main())
