""" PerViT (Peripheral Vision Transformer)

Paper: `Peripheral Vision Transformer` - https://arxiv.org/abs/2206.06801
    Juhong Min, Yucheng Zhao, Chong Luo, Minsu Cho. NeurIPS 2022.

Official code: https://github.com/juhongm999/pervit

@inproceedings{min2022peripheral,
  title={Peripheral Vision Transformer},
  author={Min, Juhong and Zhao, Yucheng and Luo, Chong and Cho, Minsu},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}

A conv stem brings the image to a single token grid at 1/16 resolution, then 12 transformer blocks with
multi-head peripheral attention (MPA) follow. MPA multiplies the content attention of every head with a learned
peripheral position attention ``phi_p`` (a function of query-key distance, produced by a small conv network that is
shared in shape but not in weights across blocks):

    A = L1-normalize_rows(phi_p * exp(q k^T * scale - rowmax)) == softmax(q k^T * scale + log(phi_p))

The second form runs through ``F.scaled_dot_product_attention`` with ``log(phi_p)`` (computed as a log-sigmoid) as
an additive mask (``fused_attn``); the first, explicit form of the official code stays selectable.

Beyond the official implementation, this one:
* works at any input size >= 32 px per side: the position grid follows the token grid (see ``PeripheralPosition``);
* caches the input-independent position attention whenever autograd needs none of its gradients (keyed on grid,
  device, dtype, autocast state and the values of the position parameters, so it can never be stale), builds it
  through the key-query offset grid, folds the stem's BatchNorms into their convs where they use running statistics
  and runs the MLP in place without autograd; each of these fast paths runs only where its gate in
  ``timm_pervit.layers.gates`` holds (``fast_paths=False`` turns them all off);
* implements the full timm model API (features, intermediates, grad checkpointing, layer-decay groups, ...).

Its layers (position engine, stem step, input check) are in ``timm_pervit.layers``, key layouts in ``timm_pervit.keys``.

Written for timm by the timm-pervit authors from the paper and the facts of the official release. Apache-2.0.
"""
import itertools
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.jit import Final

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._compat import LOADS_SAFETENSORS_HUB_FILENAME, build_mlp, calculate_drop_path_rates, checkpoint, get_device_dtype
from .checkpoint_io import check_finite, check_floating_point, state_dict_of
from .keys import OFFICIAL_KEY_MAP, RENAMED_KEYS, is_official_layout, official_to_timm, timm_to_official, to_timm_keys
from .layers import gates
from .layers.attention import peripheral_sdpa
from .layers.grad_layout_conv import GradLayoutConv2d
from .layers.inputs import MIN_INPUT_SIZE, check_image_batch
from .layers.position import POS_CACHE_BYTES, POS_MAX_BLOCK_BYTES, PeripheralPosition, PositionConvNet
from .layers.stem import ConvBnReLU, conv_bn_eval
from .paper import OFFICIAL_URL, PAPER_ID, PAPER_NAME, PAPER_RESULTS

# the names from keys, layers.inputs and layers.stem stay importable from here, where they were defined first
__all__ = [
    'PerViT', 'PeripheralPosition', 'PositionConvNet', 'PeripheralAttention', 'PerViTBlock', 'checkpoint_filter_fn',
    'official_to_timm', 'timm_to_official', 'is_official_layout', 'OFFICIAL_KEY_MAP', 'PERVIT_VARIANTS',
    'HF_HUB_NAMESPACE', 'MIN_INPUT_SIZE', 'POS_CACHE_BYTES', 'POS_MAX_BLOCK_BYTES', 'ConvBnReLU', 'conv_bn_eval',
    'check_image_batch', 'RENAMED_KEYS',
]

#: The Hugging Face Hub namespace that holds the converted weights (one place for the whole project).
HF_HUB_NAMESPACE = 'timm-pervit'

#: Architecture of the released variants: heads, stage widths, stem widths (stage depths are (2, 2, 6, 2)).
PERVIT_VARIANTS: Dict[str, Dict[str, Any]] = {
    'pervit_tiny': dict(num_heads=4, embed_dims=(128, 192, 224, 280), stem_dims=(48, 64, 96, 128)),
    'pervit_small': dict(num_heads=8, embed_dims=(272, 320, 368, 464), stem_dims=(64, 128, 192, 272)),
    'pervit_medium': dict(num_heads=12, embed_dims=(312, 468, 540, 684), stem_dims=(64, 192, 256, 312)),
}


class PeripheralAttention(nn.Module):
    """Multi-head peripheral attention: content attention reweighted by the position attention ``phi_p``."""

    fused_attn: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            fast_paths: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.fast_paths = fast_paths
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, pos_log: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            x: Tokens (B, N, C).
            pos_log: ``log(phi_p)`` of this block, (H, N, N).
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        # a 4-D (1, H, N, N) mask: with a 3-D one the CPU dispatcher falls back to the slower math kernel
        if self.fused_attn:
            x = peripheral_sdpa(qkv, pos_log.to(qkv.dtype).unsqueeze(0), self.scale, self.fast_paths)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            # the official formula: L1-normalized phi_p * exp(logits - rowmax), eps 1e-12
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = torch.exp(attn - attn.amax(dim=-1, keepdim=True)) * torch.exp(pos_log).to(attn.dtype)
            attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class PerViTBlock(nn.Module):
    """PerViT block on an NHWC token grid.

    ``x = x + DropPath(MPA(LN1(DWConv(x))))`` (the depthwise conv only feeds the attention branch), then
    ``x = Shortcut(x) + DropPath(MLP(LN2(x)))`` where the MLP and the shortcut (a Linear when the width changes, at
    the last block of a stage) output ``out_dim``.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            norm_eps: float = 1e-6,
            fast_paths: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fast_paths = fast_paths
        self.dwconv = GradLayoutConv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True, **dd)
        self.norm1 = norm_layer(dim, eps=norm_eps, **dd)
        self.attn = PeripheralAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, fast_paths=fast_paths, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, eps=norm_eps, **dd)
        self.mlp = build_mlp(
            Mlp, dim, int(dim * mlp_ratio), out_features=out_dim, act_layer=act_layer, drop=proj_drop, **dd)
        self.shortcut = nn.Linear(dim, out_dim, **dd) if out_dim != dim else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def init_weights(self) -> None:
        """trunc_normal(.02) for the attention and MLP Linears; LayerNorm (1, 0); convs and shortcut: torch defaults."""
        for m in (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for m in (self.norm1, self.norm2):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.unused
    def _mlp_in_place(self, x: torch.Tensor) -> bool:
        return gates.use_inplace_mlp(self, x)

    @torch.jit.unused
    def _forward_mlp_in_place(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        hidden = mlp.fc1(self.norm2(x))
        torch.ops.aten.gelu_(hidden, approximate=mlp.act.approximate)
        return mlp.fc2(hidden).add_(self.shortcut(x))

    def forward(self, x: torch.Tensor, pos_log: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.attn(self.norm1(y).reshape(B, H * W, C), pos_log).reshape(B, H, W, C)
        x = x + self.drop_path1(y)
        if not torch.jit.is_scripting() and self._mlp_in_place(x):
            return self._forward_mlp_in_place(x)
        x = self.shortcut(x) + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PerViT(nn.Module):
    """Peripheral Vision Transformer.

    Conv stem (4x [3x3 s2 conv, BN, ReLU] + 1x1 conv) to a 1/16 token grid, ``sum(depths)`` PerViT blocks in
    stages whose width changes at the last block of each stage, LayerNorm, average pool, Linear head. Every
    architecture knob is a constructor argument.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            embed_dims: Tuple[int, ...] = (128, 192, 224, 280),
            stem_dims: Tuple[int, ...] = (48, 64, 96, 128),
            num_heads: int = 4,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            norm_eps: float = 1e-6,
            pos_norm_eps: float = 1e-5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            pos_cache_size: int = 4,
            pos_cache_bytes: int = POS_CACHE_BYTES,
            pos_max_block_bytes: int = POS_MAX_BLOCK_BYTES,
            fast_paths: bool = True,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes (0 for no head).
            global_pool: 'avg' or '' (no pooling: the head then sees the NHWC map).
            depths: Blocks per stage.
            embed_dims: Width of every stage.
            stem_dims: Output widths of the stride-2 stem convs (their number sets the stem stride, 2**len).
            num_heads: Attention heads (the same in every block).
            mlp_ratio: MLP hidden width over block width.
            qkv_bias: Bias in the qkv projection (False in PerViT).
            norm_eps: LayerNorm epsilon.
            pos_norm_eps: GroupNorm epsilon of the position encoding.
            drop_rate: Dropout before the head.
            proj_drop_rate: Dropout after the attention projection and in the MLP.
            drop_path_rate: Stochastic depth rate, rising linearly from 0 over the blocks.
            pos_cache_size: Most token grids whose position attention is kept at inference (least recently used
                goes first; 0 disables the cache).
            pos_cache_bytes: Most bytes the kept position attention may take (0 disables the cache); one grid takes
                depth x heads x (h*w)^2 values (pervit_tiny: 7.4 MB at 224 px, 118 MB at 448 px, in float32). A grid
                that does not fit is built one block at a time as the blocks use it.
            pos_max_block_bytes: Most bytes one block's position attention may take (heads x (h*w)^2 values); a larger
                input gets a ``PositionMemoryError`` before anything is allocated.
            fast_paths: Take the gated fast paths (``timm_pervit.layers.gates``); False runs the plain path
                everywhere (the same function, slower), e.g. to rule them out when debugging.
            bn_momentum: Momentum of the stem's BatchNorms (torch default 0.1 if None; train.py's --bn-momentum).
            bn_eps: Epsilon of the stem's BatchNorms (torch default 1e-5 if None; train.py's --bn-eps).
            act_layer: MLP activation.
            norm_layer: Token norm layer.
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
        assert len(depths) == len(embed_dims), 'need one width per stage'
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_heads = num_heads
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.stem_stride = 2 ** len(stem_dims)
        self.fast_paths = fast_paths

        stem: List[nn.Module] = []
        prev = in_chans
        bn_kwargs = {k: v for k, v in (('momentum', bn_momentum), ('eps', bn_eps)) if v is not None}
        for d in stem_dims:
            stem.append(ConvBnReLU(prev, d, bn_kwargs=bn_kwargs, fast_paths=fast_paths, **dd))
            prev = d
        stem.append(nn.Conv2d(prev, embed_dims[0], kernel_size=1, bias=True, **dd))
        self.stem = nn.Sequential(*stem)

        depth = sum(depths)
        dims_in: List[int] = []
        dims_out: List[int] = []
        for s, (d, dim) in enumerate(zip(depths, embed_dims)):
            next_dim = embed_dims[s + 1] if s + 1 < len(embed_dims) else dim
            for j in range(d):
                dims_in.append(dim)
                dims_out.append(next_dim if j == d - 1 else dim)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.pos_attn = PeripheralPosition(
            num_heads, depth, eps=pos_norm_eps, cache_size=pos_cache_size, cache_bytes=pos_cache_bytes,
            max_block_bytes=pos_max_block_bytes, fast_paths=fast_paths, **dd)
        self.blocks = nn.ModuleList([
            PerViTBlock(
                dims_in[i],
                dims_out[i],
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                norm_eps=norm_eps,
                fast_paths=fast_paths,
                **dd,
            )
            for i in range(depth)
        ])
        self.num_features = self.head_hidden_size = dims_out[-1]
        self.norm = norm_layer(self.num_features, eps=norm_eps, **dd)
        self.feature_info = [
            dict(num_chs=dims_out[i], reduction=self.stem_stride, module=f'blocks.{i}') for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights()

    def init_weights(self) -> None:
        """Peripheral initialization of the paper (see the module docstring of each part)."""
        self.pos_attn.init_weights()
        for blk in self.blocks:
            blk.init_weights()
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The distance embedding of the position encoding is exempt from weight decay, like a ViT pos_attn."""
        return {'pos_attn.dist_proj.weight'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem (+ shared distance projection), one group per block."""
        return dict(
            stem=r'^stem|^pos_attn\.dist_proj',
            blocks=[(r'^blocks\.(\d+)', None), (r'^pos_attn\.blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_fast_paths(self, enable: bool = True) -> None:
        """Switch every gated fast path of the model on or off (off: the plain path everywhere, same results)."""
        for m in self.modules():
            if hasattr(m, 'fast_paths'):
                m.fast_paths = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg'), f"global_pool must be 'avg' or '', got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def position_attention(self, grid_size: Union[int, Tuple[int, int]] = 14) -> torch.Tensor:
        """The peripheral position attention ``phi_p`` of every block for a token grid (detached, for analysis).

        Args:
            grid_size: Token grid (h, w), or one int for a square grid; 224 px input -> 14.

        Returns:
            Tensor (depth, H, h*w, h*w): ``phi[block, head, query, key]`` in (0, 1).
        """
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        with torch.no_grad():
            return torch.stack(self.pos_attn.compute(h, w)).exp()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans, self.stem[0].conv.weight.dtype)
            if self._channels_last_stem():
                x = x.contiguous(memory_format=torch.channels_last)
        elif not self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x).permute(0, 2, 3, 1)  # NHWC token grid

    @torch.jit.unused
    def _channels_last_stem(self) -> bool:
        return gates.use_channels_last_stem(self)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to intermediates that have the final width (the last stage's blocks).
            stop_early: Stop iterating over blocks when last desired intermediate hit.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Only return intermediate features.

        Returns:
            The final NHWC feature map (after the final norm) and the list of block outputs, or just the list.
        """
        assert output_fmt in ('NCHW', 'NHWC'), 'Output format must be one of NCHW or NHWC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._stem(x)
        last = len(self.blocks) if torch.jit.is_scripting() or not stop_early else max_index + 1
        pos = self.pos_attn(x.shape[1], x.shape[2], last)
        for i, blk in enumerate(self.blocks):
            if i < last:  # no `break`: TorchScript unrolls ModuleList loops
                x = blk(x, pos[i])
                if i in take_indices:
                    y = self.norm(x) if norm and x.shape[-1] == self.num_features else x
                    intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune blocks (and their position encoders) not needed for the intermediates at ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.pos_attn.blocks = self.pos_attn.blocks[:max_index + 1]
        self.pos_attn.clear_cache()
        self.feature_info = self.feature_info[:max_index + 1]
        width = self.feature_info[-1]['num_chs']
        if prune_norm or width != self.num_features:
            self.norm = nn.Identity()  # the final norm does not fit a narrower last block
        self.num_features = self.head_hidden_size = width
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalized token map (B, H/16, W/16, num_features), NHWC."""
        x = self._stem(x)
        pos = self.pos_attn(x.shape[1], x.shape[2])
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, pos[i])
            else:
                x = blk(x, pos[i])
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: PerViT) -> Dict[str, torch.Tensor]:
    """Convert an official PerViT checkpoint (or pass through one of this implementation) for ``model``.

    Accepts a bare state dict or a training checkpoint holding it under 'model' / 'state_dict' (also the names this
    implementation used before, see ``timm_pervit.keys.RENAMED_KEYS``). Raises a ValueError when the tensors do not
    fit the model's architecture (naming the released variant the checkpoint belongs to, if it is another one), when
    it holds NaN or Inf values or integer tensors for floating-point weights (naming the tensors), or when it is not a
    state dict at all. The stem's first conv and the classifier are not checked: timm adapts them for ``in_chans`` /
    ``num_classes`` after this filter.
    """
    state_dict = to_timm_keys(state_dict_of(state_dict, 'the PerViT checkpoint'))
    check_floating_point(state_dict, model)  # ValueError for integer tensors of floating-point weights
    check_finite(state_dict)
    target = model.state_dict()
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
        for k, v in state_dict.items()
        if k in target and not k.startswith(('stem.0.conv.', 'head.')) and v.shape != target[k].shape
    ]
    missing_blocks = len(model.blocks) > 0 and f'blocks.{len(model.blocks) - 1}.norm1.weight' not in state_dict
    if mismatched or missing_blocks:
        # name the released variant with the checkpoint's final width, when it is not this model's
        widths = {arch['embed_dims'][-1]: name for name, arch in PERVIT_VARIANTS.items()}
        norm = state_dict.get('norm.weight')
        looks_like = widths.get(norm.shape[0]) if norm is not None and norm.dim() == 1 else None
        hint = '' if looks_like is None or norm.shape[0] == model.num_features else (
            f'it looks like a {looks_like} checkpoint: create that model instead. ')
        detail = '; '.join(mismatched[:4]) + (f' (+{len(mismatched) - 4} more)' if len(mismatched) > 4 else '')
        if missing_blocks:
            detail = (detail + '; ' if detail else '') + f'it has no weights for block {len(model.blocks) - 1}'
        raise ValueError(
            f'PerViT checkpoint does not fit this model ({model.num_heads} heads, width {model.num_features}): '
            f'{hint}Mismatch: {detail}')
    return state_dict


def _create_pervit(variant: str, pretrained: bool = False, **kwargs) -> PerViT:
    depths = kwargs.get('depths', (2, 2, 6, 2))
    # plain integers: with a meta default device (``with torch.device('meta')``) a tensor here would hold no values
    default_out = tuple(end - 1 for end in itertools.accumulate(depths))
    out_indices = kwargs.pop('out_indices', default_out)

    def build() -> PerViT:
        return build_model_with_cfg(
            PerViT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )

    if not pretrained:
        return build()
    # bounded wait for the hub, and errors of timm's weights loading step that name the problem (not published,
    # offline without cache, corrupted or missing file, ...) and how to convert and load the official release
    from .hub import pretrained_loading, safe_file_overlay
    overlay = kwargs.get('pretrained_cfg_overlay')
    with pretrained_loading(variant, kwargs.get('pretrained_cfg'), overlay, kwargs.get('cache_dir')):
        kwargs['pretrained_cfg_overlay'] = safe_file_overlay(overlay)
        model = build()
    if kwargs['pretrained_cfg_overlay'] is not overlay:
        getattr(model, 'pretrained_cfg', {}).pop('state_dict', None)  # loaded: do not keep the weights twice
    return model


def _cfg(variant: str, **kwargs) -> Dict[str, Any]:
    top1, params, gflops = PAPER_RESULTS[variant]
    # the converter's one file, named where timm can load it by name (older timm: see _compat)
    hub_file = {'hf_hub_filename': 'model.safetensors'} if LOADS_SAFETENSORS_HUB_FILENAME else {}
    return {
        'url': '',
        'hf_hub_id': f'{HF_HUB_NAMESPACE}/{variant}.in1k',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'pool_size': (14, 14),
        'crop_pct': .875,
        'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': PAPER_ID,
        'paper_name': PAPER_NAME,
        'origin_url': OFFICIAL_URL,
        'description': (
            f'{variant} trained on ImageNet-1k at 224 px by the PerViT authors; paper: top-1 {top1}%, '
            f'{params}M params, {gflops} GFLOPs.'),
        'notes': (f'top1={top1}', 'Weights converted from the official release with timm_pervit.tools.convert.'),
        **hub_file,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg(name) for name in PERVIT_VARIANTS})


@register_model
def pervit_tiny(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-T: 4 heads, widths (128, 192, 224, 280), 7.6M params."""
    return _create_pervit('pervit_tiny', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_tiny'], **kwargs))


@register_model
def pervit_small(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-S: 8 heads, widths (272, 320, 368, 464), 21.3M params."""
    return _create_pervit('pervit_small', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_small'], **kwargs))


@register_model
def pervit_medium(pretrained: bool = False, **kwargs) -> PerViT:
    """PerViT-M: 12 heads, widths (312, 468, 540, 684), 43.7M params."""
    return _create_pervit('pervit_medium', pretrained=pretrained, **dict(PERVIT_VARIANTS['pervit_medium'], **kwargs))
