"""What the model accepts: any image size of at least 32 px, its channels, its dtype; wrong inputs get an error that
names the fix; a model built on the meta device loads and runs."""
import copy
import math

import numpy as np
import pytest
import timm
import torch

from timm_pervit.tools.reference import OfficialFormula

from tests.conftest import cpu_half_conv, make_micro, perturbed_micro


def test_in_chans_and_input_errors():
    model = make_micro(in_chans=1).eval()
    assert model(torch.randn(1, 1, 40, 72)).shape == (1, 10)
    with pytest.raises(ValueError, match=r'built for 1 input channels but got 3.*in_chans=3'):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'at least 32x32 px.*got 31x64'):
        model(torch.randn(1, 1, 31, 64))
    with pytest.raises(ValueError, match='4-D image batch'):
        model(torch.randn(1, 64, 64))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (64, 160), (224, 96)])
def test_any_input_size_gives_the_official_formula_on_its_token_grid(size):
    """Any size of at least 32 px: a ceil(size / 16) token grid, and the logits the official explicit formula gives
    on that grid (float64, perturbed weights: a wrong grid, padding or position attention shows in the values)."""
    model = perturbed_micro(parts='all', scale=0.05, dtype=torch.float64).eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
        ref = OfficialFormula(model).eval()(x)
    assert feats.shape[1:3] == tuple(math.ceil(s / 16) for s in size)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_integer_images_name_the_conversion():
    model = make_micro().eval()
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r'torch\.uint8.*x\.float\(\) / 255.*normalize'):
        model(x)


def test_dtype_mismatch_names_the_cast_but_autocast_and_half_models_work():
    model = make_micro().eval()
    with pytest.raises(TypeError, match=r'torch\.float64.*float32.*x\.to\(torch\.float32\)'):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # float32 input under autocast: fine
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert bf16(x).dtype == torch.bfloat16  # float32 input into a bfloat16 model under autocast: fine
        assert bf16(x.to(torch.bfloat16)).dtype == torch.bfloat16  # a bfloat16 model with bfloat16 input: fine
        if cpu_half_conv():  # torch 2.1 has no float16 convolution on the CPU
            assert model.half()(x.half()).dtype == torch.float16  # a .half() model with float16 input: fine


def test_numpy_and_empty_inputs_name_the_problem():
    model = make_micro().eval()
    with pytest.raises(TypeError, match=r'numpy.*torch\.from_numpy'):
        model(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r'empty.*0 channels'):
        model(torch.randn(1, 0, 64, 64))


@pytest.mark.parametrize('how', ['context', 'kwarg'])
def test_meta_device_construction_then_load(how):
    ref = timm.create_model('pervit_tiny').eval()
    if how == 'context':
        with torch.device('meta'):
            model = timm.create_model('pervit_tiny')
    else:
        model = timm.create_model('pervit_tiny', device='meta')
    assert all(t.device.type == 'meta' for t in list(model.parameters()) + list(model.buffers()))
    model.to_empty(device='cpu')
    model.load_state_dict(ref.state_dict())
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
