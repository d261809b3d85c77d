"""Non-locality, head sorting and the position-attention plots of ``timm_pervit.tools.visualize`` (micro models,
CPU)."""
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from timm_pervit.tools.visualize import (
    head_order, load_model, main, non_locality, plot_non_locality, plot_position_attention, token_distances,
    token_grid, visualize_model,
)

from tests.conftest import is_png
from tests.conftest import make_micro


def test_token_distances_2x2():
    # 2x2 grid: centres at (+-1, +-1); side neighbours are 2 apart, diagonal ones 2*sqrt(2)
    d = token_distances(2)
    s = 2 * math.sqrt(2)
    expected = torch.tensor([[0, 2, 2, s], [2, 0, s, 2], [2, s, 0, 2], [s, 2, 2, 0]], dtype=torch.float32)
    torch.testing.assert_close(d, expected)


def test_token_distances_non_square():
    # 2x3 grid: rows at -1, 1; columns at -1, 0, 1 (row-major tokens)
    d = token_distances((2, 3))
    assert d.shape == (6, 6)
    assert d[0, 1].item() == pytest.approx(1.0)  # (-1,-1) -> (-1,0)
    assert d[0, 3].item() == pytest.approx(2.0)  # (-1,-1) -> (1,-1)
    assert d[0, 5].item() == pytest.approx(math.sqrt(8.0))  # opposite corners


def test_non_locality_hand_built_phi():
    n = 4  # 2x2 grid
    s2 = math.sqrt(2)
    phi = torch.zeros(2, 3, n, n, dtype=torch.float64)
    phi[0, 0] = torch.eye(n)  # attends only to itself: 0
    phi[0, 1] = 1.  # uniform: (0 + 2 + 2 + 2*sqrt(2)) / 4 per query
    phi[0, 2] = torch.eye(n) + torch.eye(n).flip(-1)  # self + diagonal opposite (weights 1, 1): sqrt(2)
    phi[1, 0] = 3 * torch.eye(n).flip(-1)  # scale does not matter: 2*sqrt(2)
    phi[1, 1] = torch.eye(n) * 3 + torch.eye(n).flip(-1)  # (3*0 + 1*2*sqrt(2)) / 4 = sqrt(2)/2
    phi[1, 2, :, 0] = 1.  # all queries attend key 0: mean over queries of d(q, 0) = (0 + 2 + 2 + 2*sqrt(2)) / 4
    nl = non_locality(phi, 2)
    expected = torch.tensor([[0., 1 + s2 / 2, s2], [2 * s2, s2 / 2, 1 + s2 / 2]], dtype=torch.float64)
    assert nl.shape == (2, 3)
    torch.testing.assert_close(nl, expected)


def test_non_locality_rejects_bad_input():
    with pytest.raises(ValueError, match='4x4 grid'):
        non_locality(torch.ones(2, 9, 9), 4)
    with pytest.raises(ValueError, match='positive'):
        non_locality(torch.zeros(4, 4), 2)


def test_head_order_sorts_local_first():
    nl = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    order = head_order(nl)
    assert order.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert (nl.gather(1, order).diff(dim=1) >= 0).all()


def test_non_locality_of_micro_model_follows_peripheral_init():
    model = make_micro().eval()
    phi = model.position_attention((3, 5))
    assert phi.shape == (12, 2, 15, 15)
    nl = non_locality(phi, (3, 5))
    assert nl.shape == (12, 2)
    # the peripheral initialization makes deeper blocks more global, bounded by uniform attention
    mean = nl.mean(-1)
    assert (mean.diff() > 0).all()
    assert nl.max() <= non_locality(torch.ones(15, 15), (3, 5)) + 1e-6
    assert nl.min() > 0


def test_token_grid():
    model = make_micro()
    assert token_grid(model, (224, 224)) == (14, 14)
    assert token_grid(model, (64, 100)) == (4, 7)
    assert token_grid(model, (33, 47)) == (3, 3)  # each stride-2 conv rounds up, as the stem does
    x = torch.randn(1, 3, 33, 47)
    assert tuple(model.eval().forward_features(x).shape[1:3]) == (3, 3)
    with pytest.raises(ValueError, match='at least 32'):
        token_grid(model, (16, 64))


def test_plots_sort_heads_and_write_png(tmp_path):
    # a hand-built phi where head order is known: block 0 heads (global, local), block 1 (local, global)
    n = 9
    d = token_distances(3)
    local = torch.exp(-4 * d)
    glob = torch.ones(n, n) * 0.9
    phi = torch.stack([torch.stack([glob, local]), torch.stack([local, glob])])
    fig = plot_position_attention(phi, 3, path=tmp_path / 'pa.png')
    assert is_png(tmp_path / 'pa.png')
    titles = [[fig.axes[b * 2 + j].get_title() for j in range(2)] for b in range(2)]
    assert titles[0][0].startswith('h1 ') and titles[0][1].startswith('h0 ')
    assert titles[1][0].startswith('h0 ') and titles[1][1].startswith('h1 ')
    # the map drawn is the query's row, the centre by default
    img = fig.axes[0].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(img.data).float(), local[4].reshape(3, 3))
    fig = plot_position_attention(phi, 3, query=(0, 2))
    img = fig.axes[0].get_images()[0].get_array()
    torch.testing.assert_close(torch.as_tensor(img.data).float(), local[2].reshape(3, 3))
    with pytest.raises(ValueError, match='outside'):
        plot_position_attention(phi, 3, query=(3, 0))
    nl = non_locality(phi, 3)
    fig = plot_non_locality(nl, 3, reference=nl * 0.5, path=tmp_path / 'nl.png')
    assert is_png(tmp_path / 'nl.png')
    ys = sorted(float(v) for coll in fig.axes[0].collections for v in coll.get_offsets()[:, 1])
    assert ys == pytest.approx(sorted(nl.flatten().tolist()), abs=1e-6)


def test_visualize_model_micro_non_square(tmp_path):
    model = make_micro().eval()
    out = visualize_model(model, (2, 4), tmp_path / 'viz', prefix='micro_')
    assert is_png(out['position_attention']) and is_png(out['non_locality'])
    assert out['position_attention'].name == 'micro_position_attention.png'
    torch.testing.assert_close(out['nl'], non_locality(model.position_attention((2, 4)), (2, 4)))


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match='unknown model .*pervit_tiny'):
        load_model('pervit_huge')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model('pervit_tiny', checkpoint=tmp_path / 'missing.safetensors')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_model('pervit_tiny', checkpoint=tmp_path / 'empty')


@pytest.mark.slow
def test_cli_with_checkpoint_file(tmp_path):
    """The real CLI on a weights file of pervit_tiny (10-class head): loads it, prints the trained non-locality."""
    import timm
    model = timm.create_model('pervit_tiny', num_classes=10)
    with torch.no_grad():
        for blk in model.pos_attn.blocks:  # make every head different from the initialization
            blk.norm2.bias.copy_(torch.linspace(-3, 3, blk.norm2.bias.numel()))
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    expected = non_locality(model.position_attention((4, 6)), (4, 6))
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_pervit', 'visualize', '--checkpoint', str(tmp_path / 'w.safetensors'),
         '--img-size', '64', '96', '--output-dir', str(tmp_path / 'out'), '--dpi', '40'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '64x96 px -> 4x6 token grid' in proc.stdout
    assert is_png(tmp_path / 'out' / 'position_attention.png') and is_png(tmp_path / 'out' / 'non_locality.png')
    block0 = next(line for line in proc.stdout.splitlines() if 'block  0:' in line)
    printed = [float(v) for v in block0.split(':')[1].split()]
    assert printed == pytest.approx(sorted(expected[0].tolist()), abs=1e-3)


def test_cli_errors(tmp_path, capsys):
    assert main(['--model', 'pervit_huge', '--output-dir', str(tmp_path)]) == 1
    assert 'unknown model' in capsys.readouterr().err
    assert main(['--checkpoint', str(tmp_path / 'nope.pth'), '--output-dir', str(tmp_path)]) == 1
    assert 'does not exist' in capsys.readouterr().err
    assert main(['--img-size', '16', '--output-dir', str(tmp_path)]) == 1
    assert 'at least 32' in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # what an environment without matplotlib looks like
    phi = torch.ones(1, 1, 4, 4)
    with pytest.raises(ImportError, match=r'timm-pervit\[viz\]'):
        plot_position_attention(phi, 2)
    assert non_locality(phi, 2).shape == (1, 1)  # the tensor API needs no matplotlib
