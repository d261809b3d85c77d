"""Learned peripheral attention: non-locality and plots of the position attention ``phi_p`` of a PerViT model.

``python -m timm_pervit visualize`` draws, for one query position (the grid centre by default), the position
attention ``phi_p(q, .)`` of every block and head — each block's heads sorted by non-locality, local heads first —
as one PNG grid, and a second PNG with the non-locality of every block and head.

Non-locality of a head (the paper's measure of how far it looks) is the mean over queries ``q`` of the
``phi_p``-weighted mean query-key distance::

    NL = mean_q( sum_k phi_p(q, k) * d(q, k) / sum_k phi_p(q, k) )

with ``d`` the Euclidean distance between token centres in the model's own normalized coordinates
(``linspace(-1, 1, n)`` per axis, so an image side has length 2 whatever the grid).

Python API (plots need matplotlib: ``pip install timm-pervit[viz]``)::

    phi = model.position_attention((14, 14))                   # (depth, heads, 196, 196), raw maps for notebooks
    nl = non_locality(phi, (14, 14))                           # (depth, heads)
    fig = plot_position_attention(phi, (14, 14))               # the paper-style grid
    paths = visualize_model(model, (14, 14), 'out/')           # both PNGs
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..layers import position

__all__ = [
    'token_distances', 'non_locality', 'head_order', 'load_model', 'token_grid', 'plot_position_attention',
    'plot_non_locality', 'visualize_model', 'main',
]

_logger = logging.getLogger(__name__)

GridSize = Union[int, Tuple[int, int]]

_DISTANCE_UNIT = 'normalized units: image side = 2'


def _grid(grid_size: GridSize) -> Tuple[int, int]:
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if h < 1 or w < 1:
        raise ValueError(f'grid size must be positive, got {(h, w)}')
    return int(h), int(w)


def _require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend, or raise an ImportError naming the fix."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            'Plotting PerViT position attention needs matplotlib: pip install "timm-pervit[viz]" '
            '(or pip install matplotlib).') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def token_distances(grid_size: GridSize, device=None, dtype=torch.float32) -> torch.Tensor:
    """Euclidean distances between all token centres of a grid, in the model's normalized coordinates.

    The model's own distances (``timm_pervit.layers.position.token_distances``), tokens in row-major order.

    Args:
        grid_size: Token grid (h, w), or one int for a square grid.
        device: Device of the result.
        dtype: Dtype of the result.

    Returns:
        Tensor (h*w, h*w) of query-key distances.
    """
    h, w = _grid(grid_size)
    return position.token_distances(h, w, device=device, dtype=dtype).view(h * w, h * w)


def non_locality(phi: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """Non-locality of position attention maps: the mean over queries of the phi-weighted query-key distance.

    Args:
        phi: Non-negative attention ``phi[..., query, key]`` over an h x w token grid, e.g. the (depth, H, N, N)
            output of ``PerViT.position_attention``.
        grid_size: Token grid (h, w) of the maps, or one int for a square grid.

    Returns:
        Tensor of shape ``phi.shape[:-2]`` (e.g. (depth, H)), in normalized units (image side = 2).
    """
    h, w = _grid(grid_size)
    n = h * w
    if phi.dim() < 2 or phi.shape[-2:] != (n, n):
        raise ValueError(
            f'phi must end with (queries, keys) = ({n}, {n}) for a {h}x{w} grid, got shape {tuple(phi.shape)}')
    phi = phi.detach()
    dist = token_distances((h, w), device=phi.device, dtype=phi.dtype)
    mass = phi.sum(-1)
    if (mass <= 0).any():
        raise ValueError('every query needs some positive position attention (sum over keys > 0)')
    return ((phi * dist).sum(-1) / mass).mean(-1)


def head_order(nl: torch.Tensor) -> torch.Tensor:
    """Per block, the head indices sorted by non-locality, most local first.

    Args:
        nl: Non-locality (depth, H).

    Returns:
        Long tensor (depth, H): ``order[b, j]`` is the head at rank j of block b.
    """
    return torch.argsort(nl, dim=-1, stable=True)


def token_grid(model: torch.nn.Module, img_size: Tuple[int, int]) -> Tuple[int, int]:
    """Token grid a PerViT produces for an input of ``img_size`` (H, W) pixels (each stem conv halves, rounding up)."""
    from ..pervit import MIN_INPUT_SIZE
    h, w = img_size
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f'PerViT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px, got {h}x{w}')
    n_halvings = max(int(getattr(model, 'stem_stride', 16)).bit_length() - 1, 0)
    for _ in range(n_halvings):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def plot_position_attention(
        phi: torch.Tensor,
        grid_size: GridSize,
        query: Optional[Tuple[int, int]] = None,
        nl: Optional[torch.Tensor] = None,
        title: Optional[str] = None,
        path: Optional[Union[str, os.PathLike]] = None,
        dpi: int = 100,
):
    """Plot ``phi_p(query, .)`` of every block (rows) and head (columns, sorted by non-locality) as one figure.

    Args:
        phi: Position attention (depth, H, N, N) with values in [0, 1] (``PerViT.position_attention``).
        grid_size: Token grid (h, w) of phi, or one int.
        query: Query token (row, col); default the grid centre.
        nl: Non-locality (depth, H) to sort and label heads by; computed from phi when None.
        title: First title line (e.g. the model), shown above the description of the figure.
        path: Save the figure there as PNG when given.
        dpi: Resolution of the saved PNG.

    Returns:
        The matplotlib Figure.
    """
    plt = _require_matplotlib()
    h, w = _grid(grid_size)
    if phi.dim() != 4:
        raise ValueError(f'phi must be (depth, heads, N, N), got shape {tuple(phi.shape)}')
    depth, heads = phi.shape[:2]
    qr, qc = (h // 2, w // 2) if query is None else query
    if not (0 <= qr < h and 0 <= qc < w):
        raise ValueError(f'query {(qr, qc)} is outside the {h}x{w} token grid')
    nl = non_locality(phi, (h, w)) if nl is None else nl
    order = head_order(nl)
    maps = phi[:, :, qr * w + qc].reshape(depth, heads, h, w).float().cpu()

    cell = 1.25
    height = cell * depth + 1.4
    fig, axes = plt.subplots(
        depth, heads, figsize=(cell * heads + 1.6, height), squeeze=False,
        gridspec_kw=dict(wspace=0.08, hspace=0.35, top=1. - 1.2 / height, bottom=0.15 / height))
    image = None
    for b in range(depth):
        for j in range(heads):
            ax = axes[b, j]
            head = int(order[b, j])
            image = ax.imshow(maps[b, head].numpy(), cmap='viridis', vmin=0., vmax=1., interpolation='nearest')
            ax.plot([qc], [qr], marker='+', color='red', markersize=6, mew=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f'h{head} NL {float(nl[b, head]):.2f}', fontsize=7, pad=2)
            if j == 0:
                ax.set_ylabel(f'block {b}', fontsize=8)
    fig.colorbar(image, ax=axes, fraction=0.02, pad=0.02, label='φ_p(query, key)')
    description = (
        f'Peripheral position attention φ_p of query {(qr, qc)} (red +) on a {h}x{w} token grid\n'
        f'heads sorted by non-locality NL ({_DISTANCE_UNIT}), local → global')
    fig.suptitle(f'{title}\n{description}' if title else description, fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches='tight')
    return fig


def plot_non_locality(
        nl: torch.Tensor,
        grid_size: GridSize,
        reference: Optional[torch.Tensor] = None,
        reference_label: str = 'at initialization',
        title: Optional[str] = None,
        path: Optional[Union[str, os.PathLike]] = None,
        dpi: int = 100,
):
    """Plot the non-locality of every head per block (sorted heads as points, their mean as a line).

    A dashed line marks the non-locality of uniform attention on the grid (a fully global head).

    Args:
        nl: Non-locality (depth, H).
        grid_size: Token grid (h, w) the non-locality was measured on, or one int.
        reference: Optional second (depth, H) non-locality to compare with (e.g. the model at initialization).
        reference_label: Legend label of ``reference``.
        title: Figure title.
        path: Save the figure there as PNG when given.
        dpi: Resolution of the saved PNG.

    Returns:
        The matplotlib Figure.
    """
    plt = _require_matplotlib()
    h, w = _grid(grid_size)
    n = h * w
    uniform = float(non_locality(torch.ones(n, n, dtype=torch.float64), (h, w)))
    depth, heads = nl.shape
    blocks = torch.arange(depth).float()
    fig, ax = plt.subplots(figsize=(max(5., 0.45 * depth + 2.), 3.6))
    sorted_nl = torch.sort(nl.float().cpu(), dim=-1).values
    for j in range(heads):
        ax.scatter(blocks.numpy(), sorted_nl[:, j].numpy(), s=14, color=plt.cm.viridis(j / max(heads - 1, 1)),
                   label='heads (sorted; color = rank)' if j == 0 else None, zorder=3)
    ax.plot(blocks.numpy(), sorted_nl.mean(-1).numpy(), color='black', lw=1.2, label='mean over heads')
    if reference is not None:
        ax.plot(blocks.numpy(), reference.float().cpu().mean(-1).numpy(), color='gray', lw=1.0, ls=':',
                marker='.', label=f'mean over heads, {reference_label}')
    ax.axhline(uniform, color='tab:red', ls='--', lw=0.9, label='uniform attention (fully global)')
    ax.set_xlabel('block')
    ax.set_xticks(blocks.numpy())
    ax.set_ylabel(f'non-locality\n({_DISTANCE_UNIT})')
    ax.set_ylim(bottom=0.)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='best')
    ax.set_title(title or f'Non-locality of every head per block ({h}x{w} token grid)', fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches='tight')
    return fig


def visualize_model(
        model: torch.nn.Module,
        grid_size: GridSize,
        output_dir: Union[str, os.PathLike],
        query: Optional[Tuple[int, int]] = None,
        prefix: str = '',
        reference_nl: Optional[torch.Tensor] = None,
        title: Optional[str] = None,
        dpi: int = 100,
) -> Dict[str, Any]:
    """Write the position-attention grid and the non-locality plot of a PerViT model as PNGs.

    Args:
        model: A PerViT (anything with ``position_attention(grid_size)``).
        grid_size: Token grid (h, w), or one int; 224 px input -> 14.
        output_dir: Folder for the PNGs (created if needed).
        query: Query token (row, col); default the grid centre.
        prefix: File name prefix.
        reference_nl: Optional (depth, H) non-locality drawn for comparison (e.g. at initialization).
        title: Extra title text (e.g. the model's name).
        dpi: PNG resolution.

    Returns:
        Dict with 'position_attention' and 'non_locality' (paths) and 'nl' (the (depth, H) tensor).
    """
    plt = _require_matplotlib()
    if not hasattr(model, 'position_attention'):
        raise TypeError(f'{type(model).__name__} has no position_attention(grid_size): pass a PerViT model')
    h, w = _grid(grid_size)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    phi = model.position_attention((h, w)).float().cpu()
    nl = non_locality(phi, (h, w))
    paths = dict(
        position_attention=output_dir / f'{prefix}position_attention.png',
        non_locality=output_dir / f'{prefix}non_locality.png',
    )
    fig = plot_position_attention(
        phi, (h, w), query=query, nl=nl, title=title, path=paths['position_attention'], dpi=dpi)
    plt.close(fig)
    fig = plot_non_locality(
        nl, (h, w), reference=reference_nl, path=paths['non_locality'], dpi=dpi,
        title=f'{title + chr(10) if title else ""}non-locality of every head per block ({h}x{w} token grid)')
    plt.close(fig)
    return dict(paths, nl=nl)


def load_model(
        model_name: str = 'pervit_tiny',
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        hub_id: Optional[str] = None,
        **kwargs,
) -> torch.nn.Module:
    """Create a PerViT through timm from a variant name, a local checkpoint (file or hub-ready folder) or a hub id.

    Args:
        model_name: A registered PerViT variant (``pervit_tiny``, ``pervit_small``, ``pervit_medium``).
        checkpoint: A weights file (.safetensors / .pth / .bin, official or timm layout) or a folder written by
            ``timm.models.save_for_hf`` (config.json + weights; its architecture wins over ``model_name``).
        hub_id: A Hugging Face Hub repo id (``org/name``) with timm weights.
        **kwargs: Extra ``timm.create_model`` arguments.

    Returns:
        The model, in eval mode. Without checkpoint or hub id: the peripheral initialization.
    """
    import timm
    from .._compat import create_model_from_folder
    from ..pervit import PERVIT_VARIANTS  # registers the models

    if checkpoint is not None and hub_id is not None:
        raise ValueError('give either a checkpoint or a hub id, not both')
    if hub_id is not None:
        try:
            model = timm.create_model(f'hf-hub:{hub_id}', pretrained=True, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f'could not load {hub_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); check the id and '
                f'the network, or download it and pass the folder with --checkpoint') from e
        return model.eval()
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(
                f'checkpoint {str(path)!r} does not exist: pass a weights file or a folder with config.json')
        if path.is_dir():
            if not (path / 'config.json').is_file():
                raise FileNotFoundError(
                    f'checkpoint folder {str(path)!r} has no config.json: pass a folder written by '
                    f'timm.models.save_for_hf, or the weights file itself')
            return create_model_from_folder(path, **kwargs).eval()
    if model_name not in PERVIT_VARIANTS:
        raise ValueError(
            f'unknown model {model_name!r}: choose one of {", ".join(PERVIT_VARIANTS)} (or pass a checkpoint folder)')
    if checkpoint is not None:
        # the classifier is not needed for the position attention: without a head (num_classes=0 differs from the
        # config's 1000 classes) timm drops the checkpoint's classifier, so checkpoints of any class count load
        kwargs.setdefault('num_classes', 0)
        overlay = dict(file=str(checkpoint))
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    return timm.create_model(model_name, **kwargs).eval()


def _parse_size(values: Sequence[int]) -> Tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f'--img-size takes one or two integers (H [W]), got {list(values)}')


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_pervit visualize``: write the position-attention and non-locality PNGs of a PerViT."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_pervit visualize',
        description='Plot the peripheral position attention phi_p of every block and head of a PerViT for one query '
                    '(heads sorted by non-locality), and the non-locality per block/head, as two PNGs.')
    parser.add_argument('--model', default='pervit_tiny', help='PerViT variant (default: pervit_tiny)')
    src = parser.add_mutually_exclusive_group()
    src.add_argument('--checkpoint', default=None,
                     help='weights file (.safetensors/.pth, timm or official layout) or a save_for_hf folder; '
                          'without it (and without --hub-id) the peripheral initialization is shown')
    src.add_argument('--hub-id', default=None, help='Hugging Face Hub repo id with timm weights')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], metavar='PX',
                        help='input size H [W] in pixels; sets the token grid (default: 224 -> 14x14)')
    parser.add_argument('--query', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                        help='query token (row, col) on the token grid (default: the centre)')
    parser.add_argument('--output-dir', default='pervit_viz', help='folder for the PNGs (default: ./pervit_viz)')
    parser.add_argument('--prefix', default='', help='file name prefix')
    parser.add_argument('--dpi', type=int, default=100, help='PNG resolution (default: 100)')
    args = parser.parse_args(argv)
    try:
        img_size = _parse_size(args.img_size)
        model = load_model(args.model, checkpoint=args.checkpoint, hub_id=args.hub_id)
        grid = token_grid(model, img_size)
        source = args.checkpoint or args.hub_id or 'peripheral initialization (untrained)'
        name = model.pretrained_cfg.get('architecture', args.model)
        out = visualize_model(
            model, grid, args.output_dir, query=tuple(args.query) if args.query else None, prefix=args.prefix,
            title=f'{name} ({source}), {img_size[0]}x{img_size[1]} px', dpi=args.dpi)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        print(f'python -m timm_pervit visualize: error: {e}', file=sys.stderr)
        return 1
    nl = out['nl']
    print(f'{name} from {source}: {img_size[0]}x{img_size[1]} px -> {grid[0]}x{grid[1]} token grid')
    print(f'non-locality ({_DISTANCE_UNIT}), heads sorted, per block:')
    for b, row in enumerate(torch.sort(nl, dim=-1).values.tolist()):
        print(f'  block {b:2d}: ' + ' '.join(f'{v:.3f}' for v in row))
    print(f'wrote {out["position_attention"]}')
    print(f'wrote {out["non_locality"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
