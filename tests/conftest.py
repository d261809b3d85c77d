"""Shared test helpers. Every test runs on CPU, offline."""
import os

import pytest
import torch

os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

#: A micro PerViT (same architecture as the fixture's): cheap enough for every feature test.
MICRO_KWARGS = dict(num_classes=10, embed_dims=(16, 24, 32, 40), stem_dims=(8, 8, 16, 16), num_heads=2)

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def micro_kwargs():
    return dict(MICRO_KWARGS)


def make_micro(**kwargs):
    """A micro PerViT with the given overrides."""
    from timm_pervit import PerViT
    return PerViT(**dict(MICRO_KWARGS, **kwargs))
