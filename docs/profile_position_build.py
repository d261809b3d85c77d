"""Prints the profile quoted in docs/benchmarks.md (CPU, 2 threads); run from the repository root."""
import timm, torch, timm_pervit  # noqa: F401
from torch.profiler import ProfilerActivity, profile

torch.set_num_threads(2)
model = timm.create_model('pervit_tiny').train()


def build():  # the position attention of a 448 px input (28 x 28 tokens), forward + backward
    sum(p.sum() for p in model.pos_attn(28, 28)).backward()


build()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    build()
events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in events)
print(f'build {total / 1e3:.0f} ms (profiled)')
for e in events[:8]:
    ms = e.self_cpu_time_total / 1e3
    print(f'{e.key:40s} {ms:7.1f} ms {100 * ms * 1e3 / total:5.1f}%  {e.count} calls')
