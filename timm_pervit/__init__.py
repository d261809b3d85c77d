"""PerViT (Peripheral Vision Transformer, NeurIPS 2022) as timm models.

Importing this package registers ``pervit_tiny``, ``pervit_small`` and ``pervit_medium`` with timm.
"""
from .pervit import (
    HF_HUB_NAMESPACE,
    MIN_INPUT_SIZE,
    PERVIT_VARIANTS,
    PerViT,
    checkpoint_filter_fn,
    official_to_timm,
    timm_to_official,
)
from .flops import count_gmacs
from .hub import PretrainedWeightsError

__version__ = '0.1.0'

__all__ = [
    'HF_HUB_NAMESPACE', 'MIN_INPUT_SIZE', 'PERVIT_VARIANTS', 'PerViT', 'PretrainedWeightsError', 'checkpoint_filter_fn',
    'count_gmacs', 'official_to_timm', 'timm_to_official', '__version__',
]
