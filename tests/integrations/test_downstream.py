"""PerViT in other libraries, the optional extras of pyproject.toml: segmentation_models_pytorch (``seg``), open_clip
(``clip``) and OpenVINO (``openvino``); the single-scale feature maps that decide which decoders fit; and the examples
of docs/deployment.md, taken from the doc and run, their printed output compared with the doc's (float values aside).

A test skips, naming the extra, only when its library is not installed; .ci/test installs every extra.
"""
import contextlib
import io
import re

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.conftest import MICRO_ARCH
from tests.conftest import REPO
from tests.conftest import require

DOC = REPO / 'docs' / 'deployment.md'
_EXTRA = {'segmentation_models_pytorch': 'seg', 'open_clip': 'clip', 'openvino': 'openvino'}


def _require(module: str):
    return require(module, reason=f'{module} is not installed: pip install "timm-pervit[{_EXTRA[module]}]"')


def doc_example(name: str):
    """The Python block after ``<!-- doc-test: name -->`` in docs/deployment.md and the output block after it."""
    text = DOC.read_text(encoding='utf-8')
    m = re.search(r'<!-- doc-test: ' + re.escape(name) + r' -->\n```python\n(.*?)```\n\n```\n(.*?)```', text, re.S)
    assert m, f'no doc-test block {name!r} (with its output block) in {DOC}'
    return m.group(1), m.group(2)


_FLOAT = re.compile(r'-?\d+\.\d+(?:e[-+]\d+)?')


def run_doc_example(name: str) -> dict:
    """Run a doc example; its printed lines must be the doc's, float values aside. Returns its namespace."""
    code, expected = doc_example(name)
    ns = {'__name__': f'doc_example_{name}'}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f'{DOC.name}:{name}', 'exec'), ns)
    ns['printed'] = out.getvalue()
    assert _FLOAT.sub('<float>', ns['printed']).splitlines() == _FLOAT.sub('<float>', expected).splitlines()
    return ns


@pytest.fixture(scope='module')
def converted_tiny(tmp_path_factory):
    """A folder with ``pervit_tiny.in1k/model.safetensors`` (random weights), as the doc's examples expect."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('weights')
    (root / 'pervit_tiny.in1k').mkdir()
    torch.manual_seed(1)
    state = timm.create_model('pervit_tiny').state_dict()
    save_file(state, str(root / 'pervit_tiny.in1k' / 'model.safetensors'))
    return root, state


@pytest.fixture
def in_weights_dir(converted_tiny, monkeypatch):
    monkeypatch.chdir(converted_tiny[0])
    return converted_tiny[1]


# ---- single-scale feature maps ------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs', [{}, MICRO_ARCH], ids=['pervit_tiny', 'micro'])
def test_feature_info_is_single_scale(kwargs):
    """Every block output, and every map of a features_only model, has stride 16: feature_info says so."""
    model = timm.create_model('pervit_tiny', **kwargs)
    assert [f['reduction'] for f in model.feature_info] == [16] * len(model.blocks)
    backbone = timm.create_model('pervit_tiny', features_only=True, **kwargs)
    assert backbone.feature_info.reduction() == [16] * 4
    for h, w in [(224, 224), (256, 320), (200, 232)]:
        maps = backbone(torch.randn(1, 3, h, w))
        assert [m.shape[-2:] for m in maps] == [(-(-h // 16), -(-w // 16))] * 4
        assert [m.shape[1] for m in maps] == backbone.feature_info.channels()


def test_smp_unet_refuses_a_single_scale_backbone():
    """What a user of smp's hierarchical decoders sees (feature_info stays honest rather than faking strides)."""
    smp = _require('segmentation_models_pytorch')
    for decoder in (smp.Unet, smp.FPN):
        with pytest.raises(ValueError, match='Unsupported model downsampling pattern'):
            decoder('tu-pervit_tiny', encoder_weights=None, classes=5)


# ---- segmentation_models_pytorch ---------------------------------------------------------------------------------
def test_readme_dpt_example():
    """The README's example (its section *Dense prediction*), smp's default decoder."""
    _require('segmentation_models_pytorch')
    readme = (DOC.parents[1] / 'README.md').read_text(encoding='utf-8')
    code = re.search(r'## Dense prediction.*?```python\n(.*?)```', readme, re.S).group(1)
    ns = {'torch': torch}  # imported at the top of the README's examples
    with torch.no_grad():
        exec(compile(code, 'README.md:dense-prediction', 'exec'), ns)
    assert ns['masks'].shape == (1, 5, 256, 320)


def test_smp_dpt_micro_forward_and_training():
    """DPT on the micro PerViT (smp hands the architecture arguments to timm): outputs at the input size, and a few
    training steps on one batch lower the loss with finite, non-zero encoder gradients."""
    smp = _require('segmentation_models_pytorch')
    model = smp.DPT('tu-pervit_tiny', encoder_weights=None, classes=5, decoder_readout='ignore',
                    decoder_intermediate_channels=(16, 32, 64, 64), decoder_fusion_channels=16, **MICRO_ARCH)
    assert model.encoder.output_strides == [16] * 4
    assert model.encoder.model.num_features == MICRO_ARCH['embed_dims'][-1]
    model.eval()
    with torch.no_grad():
        for h, w in [(224, 224), (256, 320)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5, h, w)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, target = torch.randn(2, 3, 224, 224), torch.randint(0, 5, (2, 224, 224))
    losses = []
    for step in range(3):
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.encoder.model.named_parameters()}
            # DPT uses block outputs only: PerViT's classifier and final norm get no gradient
            assert {n.split('.')[0] for n, g in grads.items() if g is None} == {'head', 'norm'}
            used = {n: g for n, g in grads.items() if g is not None}
            assert all(torch.isfinite(g).all() for g in used.values())
            assert used['stem.0.conv.weight'].abs().sum() > 0 and used['blocks.0.attn.qkv.weight'].abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_smp_dpt_doc_example(in_weights_dir):
    _require('segmentation_models_pytorch')
    ns = run_doc_example('smp-dpt')
    # encoder_weights + pretrained_cfg_overlay loaded the converted file: the parts DPT leaves unused (no gradient,
    # so the training step did not move them) still hold its values
    encoder = ns['model'].encoder.model.state_dict()
    assert torch.equal(encoder['head.weight'], in_weights_dir['head.weight'])
    assert torch.equal(encoder['norm.weight'], in_weights_dir['norm.weight'])


# ---- a simple feature pyramid for detection FPNs -----------------------------------------------------------------
def test_simple_feature_pyramid_doc_example(in_weights_dir):
    ns = run_doc_example('simple-feature-pyramid')
    assert [m.shape[-2:] for m in ns['maps']] == [(56, 80), (28, 40), (14, 20), (7, 10)]  # strides 4, 8, 16, 32
    backbone = ns['backbone']
    assert torch.equal(backbone.state_dict()['model.stem.0.conv.weight'], in_weights_dir['stem.0.conv.weight'])


# ---- open_clip ---------------------------------------------------------------------------------------------------
def test_open_clip_tower_embeds_and_locks():
    """open_clip's TimmModel around pervit_tiny: embedding shape, lock() of all but the last group(s), intermediates."""
    _require('open_clip')
    from open_clip.timm_model import TimmModel

    def tower():
        return TimmModel('pervit_tiny', embed_dim=64, pool='avg', proj='linear')

    model = tower()
    x = torch.randn(2, 3, 224, 224)
    embedding = model(x)
    assert embedding.shape == (2, 64)
    n_blocks = len(model.trunk.blocks)

    def trainable_groups(m):
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        groups = {re.match(r'(head\.proj|trunk\.norm|trunk\.(?:pos_attn\.)?blocks\.\d+)\.', n).group(1) for n in names}
        return groups, names

    model.lock(unlocked_groups=1)
    groups, names = trainable_groups(model)
    last = n_blocks - 1  # the last parameter group: the last block, its position encoder and the final norm
    assert groups == {'head.proj', 'trunk.norm', f'trunk.blocks.{last}', f'trunk.pos_attn.blocks.{last}'}
    trunk = dict(model.trunk.named_parameters())
    frozen = [n for n, p in trunk.items() if not p.requires_grad]
    assert len(frozen) + len([n for n in names if n.startswith('trunk.')]) == len(trunk)
    assert all(not trunk[n].requires_grad for n in trunk if n.startswith(('stem.', 'blocks.0.', 'pos_attn.')) and
               not n.startswith(f'pos_attn.blocks.{last}.'))

    model = tower()
    model.lock(unlocked_groups=2)
    assert trainable_groups(model)[0] == {'head.proj', 'trunk.norm'} | {
        f'trunk.{p}blocks.{i}' for i in (last - 1, last) for p in ('', 'pos_attn.')}
    model = tower()
    model.lock()  # everything in the trunk
    assert trainable_groups(model)[0] == {'head.proj'}

    if not hasattr(model, 'forward_intermediates'):
        pytest.skip('this open_clip has no TimmModel.forward_intermediates (open_clip < 2.32)')
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=[2, n_blocks - 1])
        assert [t.shape for t in out['image_intermediates']] == [(2, 192, 14, 14), (2, 280, 14, 14)]
        torch.testing.assert_close(out['image_features'], model(x))


def test_open_clip_doc_example(in_weights_dir):
    _require('open_clip')
    from torchvision.ops.misc import FrozenBatchNorm2d
    ns = run_doc_example('open-clip')
    trunk = ns['model'].visual.trunk
    state = trunk.state_dict()
    # the converted weights were loaded (and the BatchNorm statistics kept: the frozen stem has no num_batches_tracked)
    assert all(torch.equal(state[k], v) for k, v in in_weights_dir.items()
               if not k.startswith('head.') and not k.endswith('num_batches_tracked'))
    norms = [m for m in trunk.stem.modules() if 'BatchNorm' in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)


# ---- OpenVINO ----------------------------------------------------------------------------------------------------
def test_openvino_doc_example(in_weights_dir):
    """Converted once (traced at 224 x 224), compiled for CPU in float32, saved and reloaded: the same logits as eager
    PyTorch at the traced size and at others."""
    _require('openvino')
    ns = run_doc_example('openvino')
    diffs = re.findall(r'^(\d+)x3x(\d+)x(\d+): max \|openvino - torch\| = (\S+) \(from the saved file: (\S+)\)$',
                       ns['printed'], re.M)
    assert [d[:3] for d in diffs] == [('1', '224', '224'), ('2', '160', '192'), ('2', '96', '96')]
    for *_, diff, diff_file in diffs:
        assert float(diff) <= 1e-4 and float(diff_file) <= 1e-4, diffs
