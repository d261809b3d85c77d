"""Tests of the benchmark module: end-to-end runs on a micro model and the correctness gate.

No timing assertions: only that the benchmark runs, reports what it promises and refuses wrong candidates.
"""
import json
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

FIXTURES = Path(__file__).parent / 'fixtures'
MICRO = dict(num_classes=10, embed_dims=(16, 24, 32, 40), stem_dims=(8, 8, 16, 16), num_heads=2)
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
    assert len(calls) == 5 and ref.model.pos_embed.dist_proj.weight.grad is not None


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
