"""PerViT state dict key layouts: the official release's <-> this implementation's, and earlier names of its own.

Pure renaming (values untouched, no torch needed): ``official_to_timm`` / ``timm_to_official`` convert between the
official checkpoint layout and the timm one, ``to_timm_keys`` brings any accepted layout to the timm one (the step
``checkpoint_filter_fn`` starts with).
"""
import re
from typing import Any, Dict, Tuple

__all__ = [
    'OFFICIAL_KEY_MAP', 'RENAMED_KEYS', 'official_to_timm', 'timm_to_official', 'is_official_layout', 'to_timm_keys',
]

#: The official checkpoint layout <-> this implementation's, one row per renamed key prefix; ``{i}`` is a block or stem
#: index, ``{n}`` the index of the stem's final 1x1 conv (the number of stride-2 convs). Keys not listed keep their
#: name.
#: The first matching row applies, so specific prefixes come before general ones.
OFFICIAL_KEY_MAP: Tuple[Tuple[str, str], ...] = (
    ('conv_layers.conv_layers.{i}.0.', 'stem.{i}.conv.'),
    ('conv_layers.conv_layers.{i}.1.', 'stem.{i}.bn.'),
    ('conv_layers.conv1x1.', 'stem.{n}.'),
    ('rpe_proj.', 'pos_attn.dist_proj.'),
    ('blocks.{i}.attn.activation.gn1.', 'pos_attn.blocks.{i}.norm1.'),
    ('blocks.{i}.attn.activation.gn2.', 'pos_attn.blocks.{i}.norm2.'),
    ('blocks.{i}.attn.activation.', 'pos_attn.blocks.{i}.'),
    ('blocks.{i}.attn.to_qkv.', 'blocks.{i}.attn.qkv.'),
    ('blocks.{i}.conv.proj.', 'blocks.{i}.dwconv.'),
    ('blocks.{i}.res_path.', 'blocks.{i}.shortcut.'),
)

#: Earlier names of this implementation's keys, accepted by ``checkpoint_filter_fn`` (old -> new prefix).
RENAMED_KEYS: Tuple[Tuple[str, str], ...] = (('pos_embed.', 'pos_attn.'),)


def _prefix_pattern(template: str) -> 're.Pattern[str]':
    return re.compile(re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{n\}', r'(?P<n>\d+)'))


def _remap_keys(state_dict: Dict[str, Any], to_official: bool) -> Dict[str, Any]:
    """Rename keys with ``OFFICIAL_KEY_MAP`` in either direction (values untouched)."""
    src, dst = (1, 0) if to_official else (0, 1)
    if to_official:
        n_stem = max(int(k.split('.')[1]) for k in state_dict if k.startswith('stem.'))
    else:
        n_stem = sum(1 for k in state_dict if re.match(r'conv_layers\.conv_layers\.\d+\.0\.weight$', k))
    rows = [(_prefix_pattern(row[src]), row[dst]) for row in OFFICIAL_KEY_MAP]
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, template in rows:
            m = pattern.match(key)
            if m and ('n' not in m.groupdict() or int(m.group('n')) == n_stem):
                new = template.format(i=m.groupdict().get('i'), n=n_stem) + key[m.end():]
                break
        out[new] = value
    return out


def official_to_timm(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Rename the keys of an official PerViT state dict to this implementation's keys (values untouched)."""
    return _remap_keys(state_dict, to_official=False)


def timm_to_official(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Rename the keys of a timm_pervit state dict to the official layout (inverse of ``official_to_timm``)."""
    return _remap_keys(state_dict, to_official=True)


def is_official_layout(state_dict: Dict[str, Any]) -> bool:
    """True for a state dict in the official PerViT key layout."""
    return any(k.startswith(('conv_layers.', 'rpe_proj.')) or '.attn.to_qkv.' in k for k in state_dict)


def to_timm_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """This implementation's keys for a state dict in the official layout, this one or its earlier names."""
    if is_official_layout(state_dict):
        state_dict = official_to_timm(state_dict)
    for old, new in RENAMED_KEYS:
        state_dict = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state_dict.items()}
    return state_dict
