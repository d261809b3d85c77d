"""Deployment exports: ONNX (both ``torch.onnx`` exporters, run in ONNX Runtime) and ``torch.export``.

One exported file / program per exporter must serve every input size (batch, height and width dynamic), so each test
exports once at 224 px and compares with eager PyTorch at other sizes. The models are exported in eval mode without
``torch.no_grad()`` around the export, the way a new user calls it.
"""
import inspect
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import timm
import torch

from timm_pervit._compat import _release

from tests.conftest import MICRO_KWARGS
from tests.conftest import make_micro
from tests.conftest import require

#: Input sizes (h, w) the exported graphs must serve besides the traced 224 x 224.
SIZES: List[Tuple[int, int]] = [(224, 224), (160, 256), (96, 96), (448, 448)]

#: ONNX Runtime vs PyTorch tolerance on the logits.
ONNX_ATOL = 1e-4

EXPORT_EXTRA = 'the ONNX tests need onnx and onnxruntime (pip install "timm-pervit[export]")'

#: torch.export of torch < 2.5 specializes a dynamic height and width (and batch) of PerViT: the token grid is a floor
#: division of the input size, h = (H - 1) // 16 + 1, and going from the flattened tokens (B, h*w, C) back to the
#: (B, h, w, C) grid guards ``(h*w) % h == 0``, which its sympy cannot simplify once the product is expanded; its
#: constraint solver then specializes every size that divides in a guard ("guards too complex"). A three-line model
#: (strided conv, flatten, unflatten) fails the same way; torch 2.5 exports both (README, Compatibility).
EXPORT_SPECIALIZES_TOKEN_GRID = _release(torch.__version__) < (2, 5)

_HAS_DYNAMO_ONNX = 'dynamo' in inspect.signature(torch.onnx.export).parameters


def _require(module: str, reason: str = EXPORT_EXTRA) -> Any:
    """Import an optional export dependency; skip only when it is not installed (a broken install fails)."""
    return require(module, reason)


def _dynamic_shapes() -> Dict[str, Dict[int, Any]]:
    """Batch, height and width dynamic; 32 px is the smallest input PerViT takes."""
    Dim = getattr(torch.export, 'Dim', None)
    if Dim is None:  # README, Compatibility: the exports are tested on the newest torch
        pytest.skip(f'torch {torch.__version__} has no torch.export.Dim (dynamic shapes)')
    return {'x': {
        0: Dim('batch', min=1, max=256), 2: Dim('height', min=32, max=1024), 3: Dim('width', min=32, max=1024)}}


def _onnx_export(model: torch.nn.Module, path: str, dynamo: bool) -> None:
    x = torch.randn(2, 3, 224, 224)
    assert torch.is_grad_enabled()  # exported the way a new user does it: no torch.no_grad() around the call
    if dynamo:
        _require('onnxscript', reason='the dynamo-based ONNX exporter needs onnxscript')
        torch.onnx.export(
            model, (x,), path, dynamo=True, input_names=['x'], output_names=['logits'],
            dynamic_shapes=_dynamic_shapes())
    else:
        extra = {'dynamo': False} if _HAS_DYNAMO_ONNX else {}
        torch.onnx.export(
            model, (x,), path, input_names=['x'], output_names=['logits'],
            dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch'}}, **extra)


def _max_diff_per_size(model: torch.nn.Module, path: str, sizes: List[Tuple[int, int]]) -> Dict[Tuple, float]:
    """Max |ONNX Runtime - PyTorch| of the logits per (batch, h, w), one ONNX Runtime session for all sizes."""
    ort = _require('onnxruntime')
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    diffs = {}
    for i, (h, w) in enumerate(sizes):
        batch = 1 + i % 3  # batch 1, 2 and 3 also come through the dynamic batch axis
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {name: x.numpy()})[0]
        assert out.shape == ref.shape
        diffs[(batch, h, w)] = float(np.abs(out - ref).max())
    return diffs


def _assert_declared_dynamic(path: str) -> None:
    """The graph input declares batch, height and width symbolic (no baked size a runtime could trust)."""
    onnx = _require('onnx')
    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True], dims
    assert dims[1].dim_value == 3


@pytest.mark.slow
@pytest.mark.parametrize('dynamo', [
    pytest.param(True, id='dynamo', marks=pytest.mark.skipif(
        not _HAS_DYNAMO_ONNX, reason='torch.onnx.export(dynamo=True) needs torch >= 2.5')),
    pytest.param(False, id='legacy'),
])
def test_onnx_one_file_serves_every_size(tmp_path, dynamo):
    _require('onnxruntime')
    model = make_micro().eval()
    path = str(tmp_path / 'micro.onnx')
    _onnx_export(model, path, dynamo)
    _assert_declared_dynamic(path)
    diffs = _max_diff_per_size(model, path, SIZES + [(33, 47), (64, 512)])
    assert max(diffs.values()) <= ONNX_ATOL, diffs


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_DYNAMO_ONNX, reason='torch.onnx.export(dynamo=True) needs torch >= 2.5')
def test_onnx_pervit_tiny_dynamo(tmp_path):
    """The real variant through the dynamo-based exporter (the default from torch 2.9), at a size it was not traced at.
    """
    _require('onnxruntime')
    model = timm.create_model('pervit_tiny').eval()
    path = str(tmp_path / 'pervit_tiny.onnx')
    _onnx_export(model, path, dynamo=True)
    diffs = _max_diff_per_size(model, path, [(224, 224), (160, 256)])
    assert max(diffs.values()) <= ONNX_ATOL, diffs


@pytest.mark.slow
def test_onnx_through_timm_export_helper(tmp_path):
    """``timm.utils.onnx.onnx_export`` called the way timm's onnx_export.py calls it (``--dynamic-size``)."""
    _require('onnxruntime')
    from timm.utils.onnx import onnx_export
    model = timm.create_model('pervit_tiny', **MICRO_KWARGS)
    path = str(tmp_path / 'micro.onnx')
    onnx_export(
        model, path, opset=None, dynamic_size=True, aten_fallback=False, keep_initializers=False,
        check_forward=True, training=False, verbose=False, input_size=(3, 224, 224), batch_size=1)
    diffs = _max_diff_per_size(model.eval(), path, [(160, 256), (96, 96)])
    assert max(diffs.values()) <= ONNX_ATOL, diffs


@pytest.mark.slow
@pytest.mark.xfail(
    EXPORT_SPECIALIZES_TOKEN_GRID, strict=True, raises=torch._dynamo.exc.UserError,
    reason=f'torch {torch.__version__}: torch.export specializes the size of a floor-divided token grid (< 2.5)')
def test_torch_export_dynamic_height_width_and_batch():
    """torch.export at the traced size (every torch), then with a dynamic batch, height and width: one program for
    every size, the model's input check kept as a range constraint."""
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))
    exported = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=_dynamic_shapes())
    module = exported.module()
    for batch, h, w in [(1, 160, 256), (3, 96, 96), (2, 33, 47), (1, 448, 448)]:
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), msg=lambda m: f'{batch}x{h}x{w}: {m}')
    # the program keeps the model's input check as a range constraint
    with pytest.raises(Exception, match='32'):
        module(torch.randn(1, 3, 31, 64))


@pytest.mark.xfail(
    EXPORT_SPECIALIZES_TOKEN_GRID, strict=True, raises=torch._dynamo.exc.UserError,
    reason=f'torch {torch.__version__}: torch.export specializes the size of a floor-divided token grid (< 2.5)')
def test_torch_export_of_a_floor_divided_token_grid():
    """The limit behind the xfail above belongs to torch, not to PerViT: a strided conv, the tokens flattened and
    the grid restored, with a dynamic height and width."""

    class Grid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, kernel_size=3, stride=16, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x).permute(0, 2, 3, 1)
            B, H, W, C = x.shape
            return (x.reshape(B, H * W, C) * 2).reshape(B, H, W, C)

    model = Grid().eval()
    module = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=_dynamic_shapes()).module()
    x = torch.randn(3, 3, 33, 47)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x))
