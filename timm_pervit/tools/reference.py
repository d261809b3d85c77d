""" The explicit official PerViT formulation, as a baseline for benchmarks

``OfficialFormula`` wraps a ``PerViT`` (sharing its parameters, so the weights are the same by construction) and
runs the forward pass the way the official release computes it, written from the architecture description:

* multi-head peripheral attention materialises the B x H x N x N tensors of
  ``L1-normalize_rows(phi_p * exp(q k^T * scale - rowmax))`` (``phi_p = sigmoid(.)``) before multiplying with v;
* the position encoder applies the shared ``Linear(1, 4H)`` distance projection to every query-key distance and
  runs each block's first position conv on that 4H-channel map;
* the position attention is handled as the official code handles it in each mode: rebuilt on every forward pass
  in training, computed once and reused at inference (the official evaluation calls ``init_rpe()`` after loading the
  weights, which stores every block's position attention; later forwards use the stored tensors).

Only the benchmark uses it; the model itself (``timm_pervit.pervit``) computes the same function faster.
"""
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pervit import PerViT

__all__ = ['OfficialFormula', 'official_position_attention']


def official_position_attention(model: PerViT, h: int, w: int) -> List[torch.Tensor]:
    """Position attention ``phi_p`` of every block, (H, N, N) each, computed the official (unfolded) way.

    Args:
        model: The PerViT whose position-encoding weights are used.
        h: Token grid height.
        w: Token grid width.

    Returns:
        One (H, h*w, h*w) tensor per block, ``phi[head, query, key]`` in (0, 1).
    """
    pos = model.pos_attn
    n = h * w
    dist = pos.distances(h, w)  # (N, 1, h+4, w+4)
    feats = pos.dist_proj(dist.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, 4H, h+4, w+4)
    out = []
    for blk in pos.blocks:
        x = F.relu(blk.norm1(blk.conv1(feats)))
        x = torch.sigmoid(blk.norm2(blk.conv2(x)))  # (N, H, h, w): query, head, key grid
        out.append(x.reshape(n, pos.num_heads, n).transpose(0, 1))
    return out


def _explicit_attention(attn_module: nn.Module, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Peripheral attention with the official explicit formula. x: (B, N, C), phi: (H, N, N)."""
    B, N, C = x.shape
    heads = attn_module.num_heads
    qkv = attn_module.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn_module.scale
    content = torch.exp(logits - logits.max(dim=-1, keepdim=True)[0])
    attn = F.normalize(content * phi.to(content.dtype), p=1.0, dim=-1, eps=1e-12)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return attn_module.proj_drop(attn_module.proj(out))


class OfficialFormula(nn.Module):
    """Run a PerViT's weights through the explicit official computation (see the module docstring).

    The wrapped model is registered as a submodule, so ``.train()``, ``.parameters()``, ``.to()`` and optimizers act
    on the very same tensors the model uses.

    In eval mode the position attention of a token grid is computed on first use and kept, like the official model
    after ``init_rpe()``: later changes of the position-encoding weights are not seen until ``train()``/``eval()``
    or a dtype/device move drops it, and no gradient reaches those weights through it. It is computed outside any
    autocast region (the official evaluation calls ``init_rpe()`` before entering autocast), so it is full precision.
    In training mode it is rebuilt on every forward, as the official training does.
    """

    def __init__(self, model: PerViT):
        super().__init__()
        if not isinstance(model, PerViT):
            raise TypeError(f'OfficialFormula wraps a timm_pervit PerViT model, got {type(model).__name__}.')
        self.model = model
        self._phi_cache: Dict[Tuple[Any, ...], List[torch.Tensor]] = {}

    def train(self, mode: bool = True) -> 'OfficialFormula':
        self._phi_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._phi_cache.clear()  # computed from the old dtype/device copy of the weights
        return super()._apply(fn, *args, **kwargs)

    def position_attention(self, h: int, w: int) -> List[torch.Tensor]:
        """Every block's ``phi_p`` for an h x w token grid: rebuilt in training, computed once in eval mode."""
        if self.training:
            return official_position_attention(self.model, h, w)
        weight = self.model.pos_attn.dist_proj.weight
        key = (h, w, weight.device, weight.dtype)
        if key not in self._phi_cache:
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                self._phi_cache[key] = official_position_attention(self.model, h, w)
        return self._phi_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.stem(x).permute(0, 2, 3, 1)  # NHWC token grid
        B, h, w, _ = x.shape
        phis = self.position_attention(h, w)
        for blk, phi in zip(m.blocks, phis):
            C = x.shape[-1]
            y = blk.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = _explicit_attention(blk.attn, blk.norm1(y).reshape(B, h * w, C), phi).reshape(B, h, w, C)
            x = x + blk.drop_path1(y)
            x = blk.shortcut(x) + blk.drop_path2(blk.mlp(blk.norm2(x)))
        x = m.norm(x)
        return m.forward_head(x)
