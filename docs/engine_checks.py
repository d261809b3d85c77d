"""pervit_tiny checks of the position engine (float64 gradients, dynamic int8), printed as the figures in docs/.

    python docs/engine_checks.py

1. Eval-mode gradients (after a cached inference) against train mode with frozen BatchNorm, float64, 224 px.
2. ``quantize_dynamic`` against float32: top-1 agreement and relative logit error on 64 random 224 px images.
Weights: the initialization perturbed by 0.02 noise (no pretrained weights offline).
"""
import copy
import warnings

import timm
import torch
import torch.nn as nn

import timm_pervit  # noqa: F401  (registers the models where the start-up hook is off)


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    return model


def eval_gradients() -> None:
    model = _perturbed(timm.create_model('pervit_tiny').double())
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    ev, tr = copy.deepcopy(model).eval(), copy.deepcopy(model).train()
    for m in tr.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        ev(x)  # a cached inference first
    ev(x).logsumexp(-1).sum().backward()
    tr(x).logsumexp(-1).sum().backward()
    gmax = max(p.grad.abs().max().item() for p in tr.parameters())
    worst = max(((a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-3 * gmax), n)
                for (n, a), b in zip(ev.named_parameters(), tr.parameters()))
    none = sum(p.grad is None for p in ev.pos_attn.parameters())
    print(f'eval vs frozen-BN train grads: {len(list(ev.parameters()))} params, position params without grad: '
          f'{none}, max relative diff {worst[0]:.2e} ({worst[1]})')


def int8_agreement() -> None:
    model = _perturbed(timm.create_model('pervit_tiny').eval())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao's notice that eager-mode quantization moves to torchao
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    xs = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = torch.cat([model(xs[i:i + 16]) for i in range(0, 64, 16)])
        b = torch.cat([qmodel(xs[i:i + 16]) for i in range(0, 64, 16)])
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).mean().item()
    print(f'quantize_dynamic pervit_tiny: top-1 agreement {agree * 100:.1f}% on 64 random inputs, mean relative '
          f'logit error {rel:.4f}, max abs logit diff {(a - b).abs().max().item():.4f}')


if __name__ == '__main__':
    torch.manual_seed(0)
    eval_gradients()
    int8_agreement()
