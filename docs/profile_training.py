"""Prints the profile quoted in docs/benchmarks.md (CPU, 2 threads); run from the repository root."""
import timm, torch, timm_pervit  # noqa: F401
from torch.profiler import ProfilerActivity, profile

torch.set_num_threads(2)
model = timm.create_model('pervit_tiny').train()
x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))
opt = torch.optim.AdamW(model.parameters())


def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


step(), step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in events)
print(f'step {total / 1e3:.0f} ms (profiled)')
for e in events[:12]:
    ms = e.self_cpu_time_total / 1e3
    print(f'{e.key:50s} {ms:7.1f} ms {100 * ms * 1e3 / total:5.1f}%  {e.count} calls')
