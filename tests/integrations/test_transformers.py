"""Hugging Face transformers: PerViT folders load through ``TimmWrapper`` (AutoModel and the image-classification
pipeline) and give timm's logits.

Two kinds of folders: the one this package's converter writes (``pervit_hub_root`` fixture, pervit_tiny) and a plain
``timm.models.save_for_hf`` folder (micro model). timm >= 1.0.31 writes ``num_classes`` into the ``model_args`` of a
``save_for_hf`` config while transformers passes ``num_classes`` again, so the plain folder gets the workaround that
docs/deployment.md gives (drop ``num_classes`` from ``model_args``).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import timm_pervit  # noqa: F401  (explicit registration; the autoload hook is tested in a subprocess below)

from tests.conftest import MICRO_KWARGS

# skipped only when not installed: a broken install must fail
if importlib.util.find_spec('transformers') is None:
    pytest.skip('the transformers tests need transformers (pip install "timm-pervit[transformers]")',
                allow_module_level=True)

from transformers import (  # noqa: E402
    AutoConfig, AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification, pipeline)

#: The micro architecture as timm factory arguments (num_classes comes from the config's num_labels).
MICRO_ARGS: Dict[str, Any] = {k: v for k, v in MICRO_KWARGS.items() if k != 'num_classes'}


def _image(h: int = 200, w: int = 300) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype('uint8'))


def _timm_from_folder(folder: Path) -> torch.nn.Module:
    """The same folder through timm's own pretrained loading (the reference)."""
    config = json.loads((folder / 'config.json').read_text())
    return timm.create_model(
        config['architecture'], pretrained=True, num_classes=config['num_classes'], **_arch_args(config),
        pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))).eval()


def _arch_args(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in (config.get('model_args') or {}).items() if k != 'num_classes'}


def _save_for_hf_micro(folder: Path) -> torch.nn.Module:
    """A plain timm ``save_for_hf`` folder of a micro PerViT, with the documented ``num_classes`` workaround."""
    from timm.models import save_for_hf
    model = timm.create_model('pervit_tiny', **MICRO_KWARGS).eval()
    save_for_hf(model, folder, safe_serialization=True)
    config_path = folder / 'config.json'
    config = json.loads(config_path.read_text())
    config.get('model_args', {}).pop('num_classes', None)  # the workaround of docs/deployment.md
    config_path.write_text(json.dumps(config, indent=2))
    return model


def test_wrapper_built_from_config_matches_timm():
    config = TimmWrapperConfig(architecture='pervit_tiny', model_args=MICRO_ARGS, num_labels=10)
    wrapper = TimmWrapperForImageClassification(config).eval()
    model = timm.create_model('pervit_tiny', num_classes=10, **MICRO_ARGS).eval()
    model.load_state_dict(wrapper.timm_model.state_dict())
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(pixel_values=x).logits, model(x), rtol=0, atol=0)


def test_auto_model_loads_converter_folder(pervit_hub_root):
    folder = pervit_hub_root[1].output_dir
    hf = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(hf, TimmWrapperForImageClassification)
    ref = _timm_from_folder(folder)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ref(x), rtol=0, atol=0)


def test_pipeline_on_converter_folder(pervit_hub_root):
    folder = pervit_hub_root[1].output_dir
    classify = pipeline('image-classification', model=str(folder), device='cpu')
    ref = _timm_from_folder(folder)
    image = _image()
    # the pipeline's preprocessing is timm's eval transform of the model's pretrained config
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref))
    pixel_values = classify.image_processor(image)['pixel_values']
    torch.testing.assert_close(pixel_values, transform(image).unsqueeze(0), rtol=0, atol=0)
    with torch.no_grad():
        probs = ref(pixel_values).softmax(-1)[0]
    top = probs.topk(5)
    labels = timm.data.ImageNetInfo().label_descriptions()
    out = classify(image, top_k=5)
    assert [o['label'] for o in out] == [labels[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([o['score'] for o in out], top.values.numpy(), rtol=1e-6, atol=0)


def test_save_for_hf_folder_with_workaround(tmp_path):
    folder = tmp_path / 'pervit_micro'
    model = _save_for_hf_micro(folder)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    # the config-object form of the workaround (no file edit): AutoConfig, drop num_classes, pass config=
    config = AutoConfig.from_pretrained(folder)
    config.model_args.pop('num_classes', None)
    for hf in (AutoModelForImageClassification.from_pretrained(folder),
               AutoModelForImageClassification.from_pretrained(folder, config=config)):
        with torch.no_grad():
            torch.testing.assert_close(hf.eval()(pixel_values=x).logits, expected, rtol=0, atol=0)
    out = pipeline('image-classification', model=str(folder), device='cpu')(_image(), top_k=3)
    assert len(out) == 3 and all(0 < o['score'] < 1 for o in out)


def test_auto_model_without_importing_timm_pervit(tmp_path):
    """A fresh interpreter that never imports timm_pervit: the autoload hook must register pervit_* when transformers
    imports timm."""
    folder = tmp_path / 'pervit_micro'
    model = _save_for_hf_micro(folder)
    x = torch.randn(1, 3, 64, 64)
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    script = (
        'import sys\n'
        'import torch\n'
        'from safetensors.torch import load_file, save_file\n'
        'from transformers import AutoModelForImageClassification\n'
        'hf = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()\n'
        'with torch.no_grad():\n'
        '    logits = hf(pixel_values=load_file(sys.argv[2])["x"]).logits\n'
        'save_file({"logits": logits.contiguous()}, sys.argv[3])\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_PERVIT_NO_AUTOLOAD'}
    proc = subprocess.run(
        [sys.executable, '-c', script, str(folder), str(tmp_path / 'x.safetensors'), str(tmp_path / 'out.safetensors')],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(load_file(str(tmp_path / 'out.safetensors'))['logits'], model(x), rtol=0, atol=0)
