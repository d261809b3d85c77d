"""Prints the profiles quoted in docs/benchmarks.md (CPU, 2 threads); run from the repository root (the file is not
named profile.py: that would shadow the standard library module of that name, which torch imports).

    python docs/step_profile.py training         # one AdamW step of pervit_tiny, batch 32, 224 px
    python docs/step_profile.py position-build   # the position attention of a 448 px input (28 x 28 tokens), fwd + bwd
"""
import sys

import timm
import torch
import timm_pervit  # noqa: F401
from torch.profiler import ProfilerActivity, profile

torch.set_num_threads(2)
model = timm.create_model('pervit_tiny').train()
x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
opt = torch.optim.AdamW(model.parameters())


def training():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def position_build():
    sum(p.sum() for p in model.pos_attn(28, 28)).backward()


what = sys.argv[1] if len(sys.argv) > 1 else 'training'
run, rows = {'training': (training, 12), 'position-build': (position_build, 8)}[what]
run(), run()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    run()
events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in events)
print(f'{what} {total / 1e3:.0f} ms (profiled)')
for e in events[:rows]:
    ms = e.self_cpu_time_total / 1e3
    print(f'{e.key:50s} {ms:7.1f} ms {100 * ms * 1e3 / total:5.1f}%  {e.count} calls')
