"""Training-step overhead of the loop recorder, against no instrumentation and wandb.watch.

    python benchmarks/overhead.py [--repeats 60] [--loops 1 4 12] [--threads 1] [--compiled]

One process, three copies of the same `looped` model: uninstrumented; probes (cheap
statistics, every step logged, `after_backward` + `end_step` included); and
`wandb.watch(model, log="all", log_freq=1)` in offline mode, with the `wandb.log` call a
user needs to commit what watch gathered. A step is forward + backward + AdamW step.
Each repeat times one step of every variant, in changing order, so machine noise hits
all alike; ratios are of the medians. Target: probes <= 1.03x at K = 12.

`--compiled` adds a second table: `torch.compile(model)` against `torch.compile` of a copy
with the probes attached (every step logged; the compile happens in the warm-up steps, not
timed). Target: <= 1.05x at K = 12.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from loopdiag import probes
from loopdiag.models import ModelConfig, build_model

TARGET = 1.03
COMPILED_TARGET = 1.05


def make_step(model: torch.nn.Module, idx: torch.Tensor, before: Callable[[int, torch.Tensor], None] | None = None,
              after: Callable[[int, torch.Tensor], None] | None = None) -> Callable[[int], float]:
    """A timed training step; `before` runs between backward and the optimizer, `after` at the end."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> float:
        start = time.perf_counter()
        _, loss = model(idx, targets=idx)
        loss.backward()
        if before is not None:
            before(i, loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after is not None:
            after(i, loss)
        return time.perf_counter() - start

    return step


def median_times(steps: list[Callable[[int], float]], repeats: int, warmup: int = 5) -> list[float]:
    for i in range(warmup):
        for step in steps:
            step(i)
    samples: list[list[float]] = [[] for _ in steps]
    # Cycle through every order, so each variant runs equally often first, last, and right
    # after wandb (whose background process keeps working once its step has returned).
    orders = itertools.cycle(itertools.permutations(range(len(steps))))
    for r in range(repeats):
        for which in next(orders):
            samples[which].append(steps[which](warmup + r))
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    # One intra-op thread by default: on a shared 2-core machine, two threads spin-wait on
    # each other whenever another process holds a core, and steps slow down erratically.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile'd models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    torch.manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq_len))
    print(f"looped d_model={args.d_model} L=2 batch={args.batch} seq={args.seq_len} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"{'K':>3}{'plain (ms)':>12}{'probes':>9}{'wandb.watch':>13}   probes target")
    with tempfile.TemporaryDirectory() as tmp:
        run = wandb.init(mode="offline", dir=tmp, project="loopdiag-overhead")
        for n_loops in args.loops:
            cfg = ModelConfig(d_model=args.d_model, n_layers=2, n_loops=n_loops, seq_len=args.seq_len)
            plain = build_model("looped", cfg)
            probed, watched = copy.deepcopy(plain), copy.deepcopy(plain)
            recorder = probes.attach(probed)
            run.watch(watched, log="all", log_freq=1)
            steps = [
                make_step(plain, idx),
                make_step(probed, idx, before=lambda i, loss: recorder.after_backward(),
                          after=lambda i, loss: recorder.end_step(i, loss=loss, lr=1e-3)),
                make_step(watched, idx, after=lambda i, loss: run.log({"loss": loss.item()})),
            ]
            t_plain, t_probes, t_watch = median_times(steps, args.repeats)
            recorder.detach()
            run.unwatch(watched)
            verdict = "" if n_loops != 12 else ("ok" if t_probes / t_plain <= TARGET else "MISSED")
            print(f"{n_loops:>3}{t_plain * 1e3:>12.2f}{t_probes / t_plain:>8.3f}x{t_watch / t_plain:>12.3f}x"
                  f"   <= {TARGET} {verdict}")
        run.finish()
    if args.compiled:
        compiled_table(args, idx)


def compiled_table(args: argparse.Namespace, idx: torch.Tensor) -> None:
    print(f"{'K':>3}{'compiled (ms)':>15}{'+ probes':>10}   target")
    for n_loops in args.loops:
        cfg = ModelConfig(d_model=args.d_model, n_layers=2, n_loops=n_loops, seq_len=args.seq_len)
        plain = build_model("looped", cfg)
        probed = copy.deepcopy(plain)
        recorder = probes.attach(probed)
        steps = [
            make_step(torch.compile(plain), idx),
            make_step(torch.compile(probed), idx, before=lambda i, loss: recorder.after_backward(),
                      after=lambda i, loss: recorder.end_step(i, loss=loss, lr=1e-3)),
        ]
        t_plain, t_probes = median_times(steps, args.repeats)
        recorder.detach()
        verdict = "" if n_loops != 12 else ("ok" if t_probes / t_plain <= COMPILED_TARGET else "MISSED")
        print(f"{n_loops:>3}{t_plain * 1e3:>15.2f}{t_probes / t_plain:>9.3f}x   <= {COMPILED_TARGET} {verdict}")


if __name__ == "__main__":
    main()
