"""Tests of the benchmark module: end-to-end runs on a micro model and the correctness gate.

No timing assertions: only that the benchmark runs, reports what it promises and refuses wrong candidates.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import register_model

from timm_pervit import benchmark
from timm_pervit.pervit import PeripheralAttention, PerViT, checkpoint_filter_fn
from timm_pervit.reference import OfficialFormula, official_position_attention

from .conftest import MICRO_KWARGS as MICRO

FIXTURES = Path(__file__).parent / 'fixtures'
MICRO_JSON = json.dumps(MICRO)
FAST = ['--batch-size', '2', '--img-size', '64', '--iters', '2', '--warmup', '1', '--no-progress', '--no-roofline']


class _NoPositionAttention(PeripheralAttention):
    """A deliberately wrong (and cheaper) attention: it ignores the peripheral position attention."""

    def forward(self, x: torch.Tensor, pos_log: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


@register_model
def _test_broken_pervit(pretrained: bool = False, **kwargs) -> PerViT:
    kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')}
    model = PerViT(**kwargs)
    for blk in model.blocks:
        broken = _NoPositionAttention(blk.attn.qkv.in_features, num_heads=blk.attn.num_heads)
        broken.load_state_dict(blk.attn.state_dict())
        blk.attn = broken
    return model


def test_reference_matches_official_fixture():
    """The baseline is the official computation: it reproduces the official model's float64 outputs."""
    model = PerViT(**MICRO).double()
    model.load_state_dict(checkpoint_filter_fn(load_file(FIXTURES / 'micro_official_state_dict.safetensors'), model))
    expected = load_file(FIXTURES / 'micro_expected.safetensors')
    ref = OfficialFormula(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(expected['input'].double()), expected['logits_eval'], rtol=0, atol=1e-8)
    ref.train()
    torch.testing.assert_close(ref(expected['input'].double()), expected['logits_train'], rtol=0, atol=1e-8)
    phi = official_position_attention(model, 14, 14)
    torch.testing.assert_close(torch.stack(phi), model.position_attention(14), rtol=0, atol=1e-10)


def test_reference_caches_position_attention_at_inference_only(monkeypatch):
    """Like the official code: at inference the position attention is computed once (init_rpe()) and reused, in
    training it is rebuilt every step; a mode switch or a dtype move drops the kept copy."""
    from timm_pervit import reference
    calls = []

    def counting(*args):
        calls.append(args[1:])
        return official_position_attention(*args)

    monkeypatch.setattr(reference, 'official_position_attention', counting)
    ref = OfficialFormula(PerViT(**MICRO)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = ref(x)
        torch.testing.assert_close(ref(x), first, rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ref(x)  # reuses the full-precision copy, as the official evaluation does under autocast
        assert calls == [(4, 4)]
        ref(torch.randn(1, 3, 96, 96))  # another token grid: its own copy
        assert calls == [(4, 4), (6, 6)]
        ref.double()
        torch.testing.assert_close(ref(x.double()), first.double(), rtol=1e-5, atol=1e-6)
        assert calls == [(4, 4), (6, 6), (4, 4)]
    ref.train()
    for _ in range(2):
        ref(x.double()).sum().backward()
    assert len(calls) == 5 and ref.model.pos_attn.dist_proj.weight.grad is not None


@pytest.mark.slow
def test_benchmark_end_to_end_json(tmp_path):
    """Both modes, two sizes, extra candidates: one row per candidate/mode/size with sane, complete figures."""
    out = tmp_path / 'bench.json'
    rc = benchmark.main([
        '--model-kwargs', MICRO_JSON, '--mode', 'both', '--img-size', '64', '96', '--channels-last', '--amp',
        '--json', str(out), '--threads', '1', *FAST[:2], *FAST[4:]])
    assert rc == 0
    payload = json.loads(out.read_text())
    rows = payload['results']
    assert {(r['mode'], r['img_size'], r['candidate']) for r in rows} == {
        (m, s, c) for m in ('infer', 'train') for s in (64, 96) for c in ('reference', 'eager', 'channels_last', 'amp')}
    n_params = sum(p.numel() for p in PerViT(**MICRO).parameters())
    for r in rows:
        assert r['params'] == n_params
        assert len(r['img_per_s']) == 2 and all(v > 0 for v in r['img_per_s'])
        assert r['img_per_s_min'] <= r['img_per_s_median'] <= r['img_per_s_max']
        assert r['ratio'] > 0 and r['peak_mem_mb'] > 0 and r['gmacs_per_img'] > 0
        if r['candidate'] != 'amp':  # bf16 is held to the explicit formula's own bf16 error instead
            assert r['max_rel_err'] <= benchmark.TOLERANCES['float32'][1]
    by_key = {(r['mode'], r['img_size'], r['candidate']): r for r in rows}
    for s in (64, 96):
        # at inference both reuse the position attention computed once (the official code after init_rpe()): the
        # same matmuls; in training the reference rebuilds it the official (unfolded) way every step: more work
        assert by_key[('infer', s, 'reference')]['gmacs_per_img'] == pytest.approx(
            by_key[('infer', s, 'eager')]['gmacs_per_img'], rel=1e-6)
        assert by_key[('train', s, 'reference')]['gmacs_per_img'] > by_key[('train', s, 'eager')]['gmacs_per_img']
        assert by_key[('train', s, 'eager')]['gmacs_per_img'] > by_key[('infer', s, 'eager')]['gmacs_per_img']
        assert by_key[('train', s, 'eager')]['pos_share'] > 0
    assert by_key[('infer', 96, 'eager')]['gmacs_per_img'] > by_key[('infer', 64, 'eager')]['gmacs_per_img']
    assert payload['meta']['threads'] == 1


def test_correctness_gate_rejects_wrong_candidate(capsys):
    """A model whose attention drops the position attention is faster but wrong: the benchmark must refuse it."""
    rc = benchmark.main(['--model', '_test_broken_pervit', '--model-kwargs', MICRO_JSON, *FAST])
    assert rc == 1
    err = capsys.readouterr().err
    assert 'correctness check failed' in err and "'eager'" in err and 'relative error of the output' in err


def _train_runners():
    """The reference runner of a micro model in training, and a factory of 'eager' runners on the same weights."""
    torch.manual_seed(0)
    base = PerViT(**MICRO)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 2])
    ref_cand, eager_cand = benchmark.parse_candidates(['eager'])
    reference = benchmark._Runner(ref_cand, base, x, y, 'train')
    return base, reference, lambda: benchmark._Runner(eager_cand, base, x, y, 'train')


def test_correctness_gate_checks_gradients():
    """In training the gate compares gradients too: a candidate with different weights fails."""
    _, ref, eager = _train_runners()
    good = eager()
    assert benchmark.check_candidate(good, ref) < benchmark.TOLERANCES['float32'][1]
    bad = eager()
    with torch.no_grad():
        bad.model.blocks[3].mlp.fc1.weight.mul_(1.5)
    with pytest.raises(benchmark.CorrectnessError, match="'eager' \\(train\\)"):
        benchmark.check_candidate(bad, ref)


def test_unknown_candidate_is_a_clear_error(capsys):
    assert benchmark.main(['--model-kwargs', MICRO_JSON, '--candidates', 'eager,turbo', *FAST]) == 2
    assert "Unknown candidate option(s) ['turbo']" in capsys.readouterr().err


def test_console_entry_point_subprocess():
    """``python -m timm_pervit benchmark`` runs in a fresh process and prints the Markdown table."""
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_pervit', 'benchmark', '--model-kwargs', MICRO_JSON, '--img-size', '48', '--iters',
         '1', '--warmup', '0', '--batch-size', '1', '--no-progress', '--no-roofline', '--threads', '1'],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('| infer')]
    assert [ln.split('|')[4].strip() for ln in lines] == ['reference', 'eager']
    assert 'infer 48px: ' not in proc.stderr  # --no-progress: no progress lines either


def test_progress_lines_in_a_log_file(tmp_path):
    """Sent to a file (CI, nohup), the benchmark logs plain progress lines instead of a progress bar's frames;
    ``--no-progress`` (the subprocess test above) logs none."""
    log = tmp_path / 'bench.log'
    with open(log, 'w') as f:
        proc = subprocess.run(
            [sys.executable, '-m', 'timm_pervit', 'benchmark', '--model-kwargs', MICRO_JSON, '--img-size', '48',
             '--iters', '4', '--warmup', '1', '--batch-size', '1', '--no-roofline', '--threads', '1'],
            stdout=f, stderr=subprocess.STDOUT, text=True, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert '\r' not in text
    # 2 candidates x (1 warm-up + 4 timed) steps: a line per step (one per tenth, rounded up)
    steps = [ln.split(',')[0] for ln in text.splitlines() if ln.startswith('infer 48px: ')]
    assert steps == ['infer 48px: 1/10 step (10%)'] + [f'infer 48px: {n}/10 steps ({10 * n}%)' for n in range(2, 11)]
    assert text.count('| infer | 48 | 1 |') == 2  # the table follows


@pytest.mark.slow
def test_compiled_candidate_passes_the_gate(tmp_path):
    """The torch.compile candidate (inductor, CPU) runs through the float64 gate and the timed rounds."""
    out = tmp_path / 'bench.json'
    rc = benchmark.main(['--model-kwargs', MICRO_JSON, '--candidates', 'compile', '--json', str(out), '--threads', '1',
                         *FAST])
    assert rc == 0
    rows = {r['candidate']: r for r in json.loads(out.read_text())['results']}
    assert set(rows) == {'reference', 'compile'}
    assert rows['compile']['max_rel_err'] <= benchmark.TOLERANCES['float32'][0]
    assert all(v > 0 for v in rows['compile']['img_per_s'])
    # the reference row reports the explicit formula's own float32 error against the float64 truth
    assert 0 < rows['reference']['max_rel_err'] <= benchmark.TOLERANCES['float32'][1]


def test_gate_measures_against_float64_truth():
    """The gate's truth is the explicit formula in float64: a float32 candidate has a small, nonzero error and the
    tolerance grows with the explicit formula's own float32 error (not with the candidate's)."""
    base, ref, eager = _train_runners()
    gate = benchmark.CorrectnessGate(ref)
    out64, grads64 = gate.truth
    assert out64.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads64.values())
    assert set(grads64) == {n for n, _ in base.named_parameters()}
    own = gate.reference_errors(False)
    assert 0 < own['output'] < 1e-5 and max(own.values()) < benchmark.TOLERANCES['float32'][1]
    err = gate.check(eager())
    assert 0 < err < benchmark.TOLERANCES['float32'][1]
    # the reference's weights were not touched by the float64 run
    assert all(p.dtype == torch.float32 for p in ref.model.parameters())


def test_float32_gate_option(capsys):
    """--gate-float32 checks against the float32 reference (no float64 copy) and still refuses a wrong candidate."""
    _, ref, eager = _train_runners()
    gate = benchmark.CorrectnessGate(ref, float64=False)
    assert gate.truth[0].dtype == torch.float32 and max(gate.reference_errors(False).values()) == 0
    assert gate.check(eager()) < benchmark.TOLERANCES['float32'][1]
    rc = benchmark.main(['--model', '_test_broken_pervit', '--model-kwargs', MICRO_JSON, '--gate-float32', *FAST])
    assert rc == 1
    assert 'against the float32 result' in capsys.readouterr().err


# ---- the authors' code (--official-repo) and timm peers (--peers) -----------------------------------------------
# A stand-in for a checkout of the official repository, written into tmp_path: the module layout, names and calling
# conventions the loader relies on (model/pervit.py: VisionTransformer(num_classes, num_heads, emb_dims,
# convstem_dims, norm_layer), .num_patches, .init_rpe(), plain-tensor attributes made with .cuda()/.to('cuda');
# model/models.py: variant entry points registered with timm's @register_model, importing `model.pervit`), with
# parameters in the official key layout. Its forward is this package's explicit formula (timm_pervit.reference).
_FAKE_PERVIT = '''
import torch
import torch.nn as nn
from torch.func import functional_call

from timm_pervit.convert import to_official
from timm_pervit.pervit import PerViT
from timm_pervit.keys import official_to_timm as convert_official
from timm_pervit.reference import OfficialFormula

from .utils import offsets


def _add(root, name, tensor, parameter):
    *path, leaf = name.split('.')
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if parameter:
        root.register_parameter(leaf, nn.Parameter(tensor.clone()))
    else:
        root.register_buffer(leaf, tensor.clone())


class VisionTransformer(nn.Module):
    def __init__(self, num_classes=1000, num_heads=12, emb_dims=None, convstem_dims=None, norm_layer=None, **kwargs):
        super().__init__()
        self.num_patches = 196
        self.rpe = torch.linspace(0, 1, 4).cuda()  # CUDA-only code: fails without the loader's redirect
        self.offsets = offsets(4)
        self.rpe_initialized = False
        net = PerViT(in_chans=convstem_dims[0], num_classes=num_classes, embed_dims=tuple(emb_dims),
                     stem_dims=tuple(convstem_dims[1:]), num_heads=num_heads, norm_eps=norm_layer(1).eps)
        params = set(to_official(dict(net.named_parameters())))
        for name, tensor in to_official(net.state_dict()).items():
            _add(self, name, tensor.detach(), name in params)
        self._formula = [OfficialFormula(net)]  # a list: not a submodule, the parameters above are the model's

    def init_rpe(self):
        self.rpe_initialized = True

    def train(self, mode=True):
        self._formula[0].train(mode)
        return super().train(mode)

    def forward(self, x):
        assert self.rpe.device == x.device and self.rpe.dtype == x.dtype
        assert self.training != self.rpe_initialized, 'init_rpe() at inference only'
        tensors = convert_official(dict(self.named_parameters()) | dict(self.named_buffers()))
        return functional_call(self._formula[0], {'model.' + k: v for k, v in tensors.items()}, (x,))
'''

_FAKE_MODELS = '''
from timm.models.registry import register_model

from model.pervit import VisionTransformer


@register_model
def pervit_tiny(pretrained=False, **kwargs):
    raise AssertionError('not called for a micro model')
'''


@pytest.fixture
def fake_official_repo(tmp_path):
    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'pervit.py').write_text(_FAKE_PERVIT)
    (tmp_path / 'model' / 'models.py').write_text(_FAKE_MODELS)
    (tmp_path / 'model' / 'utils.py').write_text('import torch\n\n\ndef offsets(n):\n'
                                                 "    return torch.linspace(-1, 1, n).to('cuda')\n")
    return tmp_path


def test_official_loader_builds_and_loads_strictly(fake_official_repo):
    """The official code is imported from the checkout without leaking its ``model`` package or its timm
    registrations, built with its .cuda() calls redirected, loaded strictly, and prepared per mode."""
    import timm
    from timm_pervit import official
    cuda, to = torch.Tensor.cuda, torch.Tensor.to
    code = official.load_official_code(fake_official_repo)
    assert 'model' not in sys.modules and str(fake_official_repo) not in sys.path
    assert timm.models.model_entrypoint('pervit_tiny').__module__ == 'timm_pervit.pervit'
    model = PerViT(**MICRO)
    for mode in ('infer', 'train'):
        net = official.build_official_model(code, model, mode, dtype=torch.float64)
        assert torch.Tensor.cuda is cuda and torch.Tensor.to is to  # patched only while building
        assert net.training == (mode == 'train') and net.rpe_initialized == (mode == 'infer')
        assert net.rpe.dtype == torch.float64 and official.official_token_grid(net) == 14
        sd = official.official_grads_to_timm(dict(net.state_dict()))
        assert sd.keys() == model.state_dict().keys()
        assert all(torch.equal(sd[k].float(), v.float()) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match='not a checkout of the official PerViT code'):
        official.load_official_code(fake_official_repo / 'model')


def test_official_loader_names_missing_dependency(fake_official_repo):
    (fake_official_repo / 'model' / 'pervit.py').write_text('import einops_not_installed_here\n' + _FAKE_PERVIT)
    from timm_pervit import official
    with pytest.raises(ImportError, match='pip install einops_not_installed_here'):
        official.load_official_code(fake_official_repo)
    assert 'model' not in sys.modules


def _micro_rows(out):
    payload = json.loads(out.read_text())
    return payload, {(r['mode'], r['img_size'], r['candidate']): r for r in payload['results']}


@pytest.mark.slow
def test_official_candidate_and_peers(fake_official_repo, tmp_path):
    """--official-repo adds the official code as a gated candidate (plus its float64 check against the truth) at the
    one size it accepts; --peers adds timm models, ungated, with GMACs and % roofline; --baseline sets the ratios."""
    out = tmp_path / 'bench.json'
    rc = benchmark.main([
        '--model-kwargs', MICRO_JSON, '--mode', 'both', '--img-size', '224', '64', '--batch-size', '2',
        '--iters', '2', '--warmup', '0', '--no-progress', '--threads', '1', '--json', str(out),
        '--official-repo', str(fake_official_repo), '--peers', 'deit_tiny_patch16_224,resnet10t',
        '--baseline', 'official'])
    assert rc == 0
    payload, rows = _micro_rows(out)
    assert payload['meta']['official_repo'] == str(fake_official_repo.resolve())
    for mode in ('infer', 'train'):
        assert [r['candidate'] for r in payload['results'] if r['mode'] == mode and r['img_size'] == 224] == [
            'reference', 'eager', 'official', 'deit_tiny_patch16_224', 'resnet10t']
        assert (mode, 64, 'official') not in rows  # the official code only takes 224px input
        off = rows[(mode, 224, 'official')]
        assert off['kind'] == 'official' and off['params'] == rows[(mode, 224, 'eager')]['params']
        assert off['max_rel_err'] <= benchmark.TOLERANCES['float32'][1]
        assert off['f64_err'] <= benchmark.TOLERANCES['float64'][1]  # the stand-in has no float32 distance table
        assert off['ratio'] == 1 and rows[(mode, 224, 'eager')]['baseline'] == 'official'
        assert rows[(mode, 64, 'eager')]['baseline'] == 'reference'  # no official run at 64px
        for size in (224, 64):
            for peer in ('deit_tiny_patch16_224', 'resnet10t'):
                r = rows[(mode, size, peer)]
                assert r['kind'] == 'peer' and r['max_rel_err'] is None and r['params'] > 10 * off['params']
                assert r['gmacs_per_img'] > 0 and 0 < r['roofline_pct'] and all(v > 0 for v in r['img_per_s'])
    # timm's own figure for DeiT-Ti is 1.3 GMACs (1000 classes)
    assert rows[('infer', 224, 'deit_tiny_patch16_224')]['gmacs_per_img'] == pytest.approx(1.26, rel=0.02)
    fields = benchmark.BenchmarkResult.__dataclass_fields__
    table = benchmark.format_table([
        benchmark.BenchmarkResult(**{k: (float('nan') if v is None else v) for k, v in r.items() if k in fields})
        for r in payload['results']], torch.device('cpu')).splitlines()
    peer = next(ln for ln in table if '| infer | 224 | 2 | deit_tiny_patch16_224 |' in ln).strip('| ').split(' | ')
    assert peer[-1] == 'peer' and float(peer[9]) > 1 and float(peer[11]) > 0  # error, GMACs/img, % roofline
    official = next(ln for ln in table if '| train | 224 | 2 | official |' in ln).strip('| ').split(' | ')
    assert official[-2] == 'every fwd' and '(f64 ' in official[-1] and official[5] == '1.00x'


@pytest.mark.parametrize('scale,message', [
    (2., "candidate 'official' (infer) disagrees"),  # a plain wrong computation: the float32 gate stops it
    # a difference hidden in float32 rounding: only the float64 run of the official code against the truth sees it
    (1 + 1e-6, 'the official code (infer, float64) disagrees with the explicit formula'),
])
def test_official_candidate_is_gated(fake_official_repo, capsys, scale, message):
    """An official checkout that computes something else (here: with a scaled weight) stops the run."""
    call = '        return functional_call('
    broken = _FAKE_PERVIT.replace(call, f"        tensors['norm.weight'] = {scale!r} * tensors['norm.weight']\n" + call)
    (fake_official_repo / 'model' / 'pervit.py').write_text(broken)
    rc = benchmark.main(['--model-kwargs', MICRO_JSON, '--official-repo', str(fake_official_repo), *FAST[:2],
                         '--img-size', '224', *FAST[4:]])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_peer_and_baseline_errors(capsys):
    assert benchmark.main(['--model-kwargs', MICRO_JSON, '--peers', 'not_a_timm_model', *FAST]) == 2
    assert "Unknown peer model 'not_a_timm_model'" in capsys.readouterr().err
    assert benchmark.main(['--model-kwargs', MICRO_JSON, '--baseline', 'official', *FAST]) == 2
    assert "--baseline 'official' is not a candidate" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('PERVIT_OFFICIAL_REPO'),
                    reason='set PERVIT_OFFICIAL_REPO to a checkout of github.com/juhongm999/pervit (needs einops)')
def test_real_official_code(tmp_path):
    """The authors' own code, on the same weights: agrees with the float64 truth and passes the float32 gate."""
    pytest.importorskip('einops', reason='the official code imports einops')
    out = tmp_path / 'bench.json'
    rc = benchmark.main([
        '--model-kwargs', MICRO_JSON, '--mode', 'both', '--img-size', '224', '--batch-size', '2', '--iters', '1',
        '--warmup', '0', '--no-progress', '--no-roofline', '--threads', '1', '--json', str(out),
        '--official-repo', os.environ['PERVIT_OFFICIAL_REPO']])
    assert rc == 0
    _, rows = _micro_rows(out)
    for mode in ('infer', 'train'):
        off = rows[(mode, 224, 'official')]
        assert off['max_rel_err'] <= benchmark.TOLERANCES['float32'][1]
        assert off['f64_err'] <= benchmark.OFFICIAL_TRUTH_TOLERANCES['float64'][1]
        # at inference the official model reuses what init_rpe() stored: it counts the same MACs as ours
        if mode == 'infer':
            assert off['gmacs_per_img'] == pytest.approx(rows[(mode, 224, 'eager')]['gmacs_per_img'], rel=1e-6)


def test_int8_candidate_is_gated_and_inference_only():
    """``--int8``: quantize_dynamic of every Linear, checked against the float64 formula at the int8 tolerance, left
    out of training; its params and GMACs are the float model's (a quantized Linear holds no parameters)."""
    model = PerViT(**MICRO).eval()
    cands = benchmark.parse_candidates(['eager', 'int8'])
    assert [c.name for c in cands] == ['reference', 'eager', 'int8'] and cands[2].int8
    results = benchmark.run_benchmark(model, cands, 64, 2, 'infer', torch.device('cpu'), warmup=0, iters=1,
                                       progress=False)
    by_name = {r.candidate: r for r in results}
    assert 0 < by_name['int8'].max_rel_err <= benchmark.INT8_TOLERANCE
    assert by_name['int8'].params == by_name['eager'].params
    assert by_name['int8'].gmacs_per_img == by_name['reference'].gmacs_per_img
    trained = benchmark.run_benchmark(model, cands, 64, 2, 'train', torch.device('cpu'), warmup=0, iters=1,
                                       progress=False)
    assert [r.candidate for r in trained] == ['reference', 'eager']
