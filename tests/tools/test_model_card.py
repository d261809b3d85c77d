"""Metadata of weights folders: the converter's model card (sections, comparison, citations, snippets that run) and
config.json files that describe the weights saved and load in timm and in transformers' way."""
import json
import re

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from timm_pervit._compat import create_model_from_folder
from timm_pervit.tools.flops import count_gmacs
from timm_pervit.tools.model_card import model_card, save_for_hf, variant_stats
from timm_pervit.paper import CITATION, PAPER_RESULTS, TIMM_CITATION

from tests.conftest import MICRO_KWARGS

REPO = 'timm-pervit/pervit_tiny.in1k'


def _card(pervit_hub_root) -> str:
    return (pervit_hub_root[1].output_dir / 'README.md').read_text()


def _snippets(card: str):
    return re.findall(r'```python\n(.*?)```', card, flags=re.S)


def _transformers_style_create(config: dict) -> torch.nn.Module:
    """What transformers' TimmWrapperForImageClassification does with a config.json (without needing it)."""
    return timm.create_model(
        config['architecture'], pretrained=False, num_classes=config['num_classes'], **config.get('model_args', {}))


def test_card_sections_and_header(pervit_hub_root):
    card = _card(pervit_hub_root)
    meta = yaml.safe_load(card.split('---\n')[1])
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    headings = [line for line in card.splitlines() if line.startswith('#')]
    for heading in ('# Model card for pervit_tiny.in1k', '## Model Details', '## Model Usage',
                    '### Image Classification', '### Feature Map Extraction', '### Image Embeddings',
                    '## Model Comparison', '## Citation'):
        assert heading in headings, heading
    assert CITATION in card and TIMM_CITATION in card


def test_card_comparison_is_measured(pervit_hub_root):
    card = _card(pervit_hub_root)
    stats = variant_stats()
    assert list(stats) == list(PAPER_RESULTS)
    # the meta-device measurement equals the real model's
    tiny = timm.create_model('pervit_tiny')
    assert stats['pervit_tiny'][0] == sum(p.numel() for p in tiny.parameters())
    assert stats['pervit_tiny'][1] == pytest.approx(count_gmacs(tiny), rel=1e-9)
    rows = {r.split('|')[1].strip(' *'): [c.strip() for c in r.split('|')[2:-1]]
            for r in card.splitlines() if r.startswith('| ') and '.in1k' in r}
    assert sorted(rows) == sorted(f'{v}.in1k' for v in PAPER_RESULTS)
    for variant, (params, gmacs) in stats.items():
        top1, _, paper_gflops = PAPER_RESULTS[variant]
        assert rows[f'{variant}.in1k'] == [f'{params / 1e6:.2f}', f'{gmacs:.3f}', str(paper_gflops), str(top1)]
    assert '| **pervit_tiny.in1k** |' in card  # this card's model stands out


def test_card_for_other_class_count_prints_indices():
    card = model_card('pervit_tiny', 7_000_000, gmacs=1.7, num_classes=10,
                      stats={v: (1, 1.) for v in PAPER_RESULTS})
    classify = _snippets(card)[0]
    assert 'ImageNetInfo' not in classify and "print(f'class {i}" in classify


def _run_snippet(code: str, capsys) -> str:
    """Run a card snippet as written (its hub id is served by the loopback hub), with a generated image."""
    assert f"'hf-hub:{REPO}'" in code
    # a tiny generated image instead of the download
    code, n = re.subn(r'^img = .*$', 'img = _generated_image', code, flags=re.M)
    assert n == 1
    gradient = Image.linear_gradient('L').resize((48, 40))
    image = Image.merge('RGB', (gradient, gradient.rotate(90), gradient.transpose(Image.FLIP_LEFT_RIGHT)))
    capsys.readouterr()
    exec(compile(code, '<model card snippet>', 'exec'), {'_generated_image': image, '__name__': '__snippet__'})
    return capsys.readouterr().out


def _commented_shapes(code: str):
    """The shapes the snippet's comments promise, e.g. '# (1, 280)' -> ['(1, 280)']."""
    return [re.findall(r'\(\d+(?:, \d+)*\)', line.split('#', 1)[1]) for line in code.splitlines()
            if 'print(' in line and '#' in line]


def test_card_snippets_run_as_written(pervit_hub_root, pervit_loopback_hub, pervit_hf_env, capsys):
    """Every usage snippet runs as written against the converted repo on a loopback hub, with only the image
    replaced (the download is not reachable offline)."""
    pervit_hf_env(pervit_loopback_hub.url)
    classify, features, embed = _snippets(_card(pervit_hub_root))

    out = _run_snippet(classify, capsys).strip().splitlines()
    assert len(out) == 5
    probs = [float(line.rsplit(': ', 1)[1].rstrip('%')) for line in out]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.1
    names = [line.rsplit(': ', 1)[0] for line in out]
    labels = timm.data.ImageNetInfo()
    assert all(n in labels.label_descriptions() for n in names)

    out = _run_snippet(features, capsys).strip().splitlines()
    assert out == _commented_shapes(features)[0]  # the four stage outputs the comment lists

    out = _run_snippet(embed, capsys).strip().splitlines()
    assert out == [shapes[0] for shapes in _commented_shapes(embed)]


def test_converter_config_is_clean(pervit_hub_root):
    """The converter describes the ImageNet-1k release, and its config loads the transformers way too."""
    config = json.loads((pervit_hub_root[1].output_dir / 'config.json').read_text())
    cfg = config['pretrained_cfg']
    assert 'ImageNet-1k' in cfg['description'] and cfg['tag'] == 'in1k' and cfg['origin_url'].endswith('/pervit')
    assert 'num_classes' not in config.get('model_args', {})
    model = _transformers_style_create(config)
    assert model.num_classes == 1000


def test_save_for_hf_describes_the_weights_saved(tmp_path):
    model = timm.create_model('pervit_tiny', **MICRO_KWARGS).eval()
    arch = {k: v for k, v in MICRO_KWARGS.items() if k != 'num_classes'}
    folder = save_for_hf(
        model, tmp_path / 'digits', description='micro PerViT trained on 64 px digits', tag='digits',
        notes=('10 classes',), label_names=[f'digit {i}' for i in range(10)],
        data_config=dict(input_size=(3, 64, 64), mean=(.5, .5, .5), std=(.5, .5, .5), crop_pct=1.0,
                         interpolation='bilinear'),
        model_args=arch)
    text = (folder / 'config.json').read_text()
    config = json.loads(text)
    cfg = config['pretrained_cfg']
    assert cfg['description'] == 'micro PerViT trained on 64 px digits' and cfg['tag'] == 'digits'
    assert cfg['notes'] == ['10 classes'] and 'origin_url' not in cfg
    assert 'ImageNet' not in text and 'top1=' not in text  # nothing of the default (ImageNet-1k) config is left
    assert cfg['input_size'] == [3, 64, 64] and cfg['mean'] == [.5, .5, .5] and cfg['pool_size'] == [4, 4]
    assert config['num_classes'] == cfg['num_classes'] == 10 and config['label_names'][3] == 'digit 3'
    assert config['model_args']['embed_dims'] == list(MICRO_KWARGS['embed_dims'])
    assert 'num_classes' not in config['model_args']

    # timm: the folder re-creates the model, its weights and its metadata (local-dir: where timm has it)
    reloaded = create_model_from_folder(folder).eval()
    assert reloaded.num_classes == 10
    assert reloaded.pretrained_cfg['description'] == cfg['description']
    assert tuple(timm.data.resolve_model_data_config(reloaded)['input_size']) == (3, 64, 64)
    saved = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in saved.items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))

    # transformers' TimmWrapper passes num_classes next to **model_args: it must not be in there twice
    assert _transformers_style_create(config).num_classes == 10


def test_save_for_hf_rejects_bad_metadata(tmp_path):
    model = timm.create_model('pervit_tiny', **MICRO_KWARGS)
    with pytest.raises(ValueError, match='label names'):
        save_for_hf(model, tmp_path / 'a', description='x', label_names=['a', 'b'])
    with pytest.raises(ValueError, match='preprocessing keys'):
        save_for_hf(model, tmp_path / 'b', description='x', data_config=dict(img_size=64))
