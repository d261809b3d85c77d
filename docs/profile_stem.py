"""Prints the profile quoted in docs/benchmarks.md (CPU, 2 threads); run from the repository root."""
import statistics, time
import timm, torch, timm_pervit  # noqa: F401

torch.set_num_threads(2)
torch.manual_seed(0)
model = timm.create_model('pervit_tiny').train()
x = torch.randn(32, 3, 224, 224)
cl = torch.channels_last


def step():  # forward + backward of the whole model (no optimizer)
    model(x).logsumexp(-1).mean().backward()


def stem():  # forward + backward of the conv stem alone, NCHW as in training
    model.stem(x).sum().backward()


def stem_cl():  # the same, channels-last
    model.stem(x.contiguous(memory_format=cl)).sum().backward()


times = {f.__name__: [] for f in (step, stem, stem_cl)}
for f in times:
    globals()[f]()  # warm-up
for _ in range(5):
    for name in times:
        t = time.perf_counter()
        globals()[name]()
        times[name].append(time.perf_counter() - t)
ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"step {ms['step']:.0f} ms, stem NCHW {ms['stem']:.0f} ms ({100 * ms['stem'] / ms['step']:.0f}%), "
      f"stem channels-last {ms['stem_cl']:.0f} ms")
# batch statistics of the first stem BatchNorm's input, float32 kernels against float64
with torch.no_grad():
    y = model.stem[0].conv(x)
y64 = y.double()
mean64, invstd64 = y64.mean((0, 2, 3)), (y64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
for name, t in (('NCHW', y), ('channels-last', y.contiguous(memory_format=cl))):
    _, mean, invstd = torch.native_batch_norm(t, None, None, None, None, True, 0.1, 1e-5)
    err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    print(f'{name} BatchNorm batch statistics: mean rel err {err(mean, mean64):.1e}, '
          f'invstd rel err {err(invstd, invstd64):.1e}')
