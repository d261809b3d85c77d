"""torch.hub entrypoints of timm-pervit: PerViT (Peripheral Vision Transformer, NeurIPS 2022) through timm.

    model = torch.hub.load('<owner>/timm-pervit', 'pervit_small', pretrained=True)
    model = torch.hub.load('/path/to/timm-pervit', 'pervit_tiny', source='local', num_classes=10)

Every entrypoint takes ``pretrained`` and forwards all other keyword arguments to ``timm.create_model`` (e.g.
``num_classes``, ``in_chans``, ``drop_path_rate``, ``features_only``, ``pretrained_cfg_overlay``, ``device``).
Pretrained weights come from the Hugging Face Hub through timm. The package is imported from this repository (torch.hub
puts its folder first on ``sys.path``), which registers the models with timm.
"""
import timm_pervit as _timm_pervit  # noqa: F401  (registers pervit_* with timm)
from timm import create_model as _create_model
from torch import nn as _nn

dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']


def pervit_tiny(pretrained: bool = False, **kwargs) -> _nn.Module:
    """PerViT-T (7.6M params, 1.7 GMACs at 224 px; paper: 78.8% ImageNet-1k top-1).

    Args:
        pretrained: Load the ImageNet-1k weights (``pervit_tiny.in1k``) from the Hugging Face Hub.
        **kwargs: Forwarded to ``timm.create_model`` (``num_classes``, ``in_chans``, ``drop_path_rate``, ...).

    Returns:
        The model, a ``timm_pervit.PerViT``.
    """
    return _create_model('pervit_tiny', pretrained=pretrained, **kwargs)


def pervit_small(pretrained: bool = False, **kwargs) -> _nn.Module:
    """PerViT-S (21.3M params, 4.8 GMACs at 224 px; paper: 82.1% ImageNet-1k top-1).

    Args:
        pretrained: Load the ImageNet-1k weights (``pervit_small.in1k``) from the Hugging Face Hub.
        **kwargs: Forwarded to ``timm.create_model`` (``num_classes``, ``in_chans``, ``drop_path_rate``, ...).

    Returns:
        The model, a ``timm_pervit.PerViT``.
    """
    return _create_model('pervit_small', pretrained=pretrained, **kwargs)


def pervit_medium(pretrained: bool = False, **kwargs) -> _nn.Module:
    """PerViT-M (43.7M params, 9.4 GMACs at 224 px; paper: 82.9% ImageNet-1k top-1).

    Args:
        pretrained: Load the ImageNet-1k weights (``pervit_medium.in1k``) from the Hugging Face Hub.
        **kwargs: Forwarded to ``timm.create_model`` (``num_classes``, ``in_chans``, ``drop_path_rate``, ...).

    Returns:
        The model, a ``timm_pervit.PerViT``.
    """
    return _create_model('pervit_medium', pretrained=pretrained, **kwargs)
