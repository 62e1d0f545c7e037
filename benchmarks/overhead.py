"""Training-step overhead of the loop recorder, against no instrumentation and wandb.watch.

    python benchmarks/overhead.py [--repeats 60] [--loops 1 4 12] [--d-model 64] [--threads 1]
        [--dropout 0.1] [--compiled] [--phases]

One process, three copies of the same model: uninstrumented; probes (cheap statistics,
every step logged, `after_backward` + `end_step` included); and
`wandb.watch(model, log="all", log_freq=1)` in offline mode, with the `wandb.log` call a
user needs to commit what watch gathered. A step is forward + backward + AdamW step.
Each repeat times one step of a variant and one of the uninstrumented model, in
alternating order; the ratio is the median over repeats of the two steps' ratio, which
cancels the machine's slower stretches. Probes and wandb.watch are timed in turn, not in
one loop: watch's background process keeps working after its step has returned. On this
2-core machine, three steps timed together with ratios of medians put the probes of our
K = 12 model anywhere from 1.00x to 1.08x in five runs; paired and apart, 1.022-1.034x.
Target: probes <= 1.03x at K = 12.

Two models, one table each: our `looped` (two blocks per loop), and a user's model that
loopdiag did not build, `nn.TransformerEncoderLayer` run K times (`user_model.py`'s
`looped`, attached with `loop_module="block"`). The probes' per-loop work is a few passes
over the loop's output, so their share grows as the work per loop shrinks: one layer
per loop at a small width is where a user pays most (`--d-model` to see it shrink).
`--dropout P` gives the user's layer dropout P: its loop statistics are then recorded from a
rerun of each logged forward in eval mode (`attach(rerun_without_dropout=...)`), which the
table times beside the probes without it.

`--compiled` adds a second table: `torch.compile(model)` against `torch.compile` of a copy
with the probes attached (every step logged; the compile happens in the warm-up steps, not
timed). Target: <= 1.05x at K = 12.

`--phases` adds, per model at the largest K, where the probes' time goes: the median
milliseconds of each phase of a step (forward with the per-loop hooks, backward with the
gradient hooks, `after_backward`, the optimizer, `end_step`), plain and probed, the two
stepped in turn.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from user_model import UserLoopedLM

from loopdiag import probes
from loopdiag.models import ModelConfig, build_model

TARGET = 1.03
COMPILED_TARGET = 1.05


def ours_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx, targets=idx)[1]


def user_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)  # the same targets as `ours_loss`: the cost is the same
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx.reshape(-1))


def make_step(model: nn.Module, idx: torch.Tensor, before: Callable[[int, torch.Tensor], None] | None = None,
              after: Callable[[int, torch.Tensor], None] | None = None,
              loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor] = ours_loss) -> Callable[[int], float]:
    """A timed training step; `before` runs between backward and the optimizer, `after` at the end."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> float:
        start = time.perf_counter()
        loss = loss_of(model, idx)
        loss.backward()
        if before is not None:
            before(i, loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after is not None:
            after(i, loss)
        return time.perf_counter() - start

    return step


def timed_against(plain: Callable[[int], float], other: Callable[[int], float], repeats: int,
                  warmup: int = 5) -> tuple[float, float]:
    """(median step time of `plain`, median over repeats of other's step time / plain's).
    A repeat times one step of each, in alternating order; the ratio within a repeat cancels
    the machine's slower stretches, which a ratio of the two medians keeps."""
    for i in range(warmup):
        plain(i)
        other(i)
    plain_times, ratios = [], []
    for r in range(repeats):
        if r % 2:
            t_other, t_plain = other(warmup + r), plain(warmup + r)
        else:
            t_plain, t_other = plain(warmup + r), other(warmup + r)
        plain_times.append(t_plain)
        ratios.append(t_other / t_plain)
    return statistics.median(plain_times), statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    # One intra-op thread by default: on a shared 2-core machine, two threads spin-wait on
    # each other whenever another process holds a core, and steps slow down erratically.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0, help="the user's layer's dropout")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--phases", action="store_true", help="also time each phase of a step at the largest K")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "seq_len", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if min(args.loops) < 1:
        parser.error(f"--loops must be at least 1, got {min(args.loops)}")
    try:
        ModelConfig(d_model=args.d_model, seq_len=args.seq_len)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    torch.manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq_len))
    print(f"d_model={args.d_model} batch={args.batch} seq={args.seq_len} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}"
          + (f" dropout={args.dropout:g} (the user's model)" if args.dropout else ""))
    n_heads = ModelConfig().n_heads  # the same heads in both models

    def ours(n_loops: int) -> tuple[nn.Module, str | None]:
        cfg = ModelConfig(d_model=args.d_model, n_layers=2, n_loops=n_loops, seq_len=args.seq_len)
        return build_model("looped", cfg), None

    def users(n_loops: int) -> tuple[nn.Module, str | None]:
        model = UserLoopedLM("looped", n_loops, args.d_model, n_heads, args.seq_len, dropout=args.dropout)
        return model, model.loop_module

    with tempfile.TemporaryDirectory() as tmp:
        run = wandb.init(mode="offline", dir=tmp, project="loopdiag-overhead")
        print("\nloopdiag's `looped`, two blocks per loop")
        eager_table(run, args, idx, ours, ours_loss)
        print(f"\na user's model: nn.TransformerEncoderLayer run K times ({n_heads} heads), loop_module='block'")
        eager_table(run, args, idx, users, user_loss)
        run.finish()
    if args.phases:
        for title, build, loss_of in (("loopdiag's `looped`", ours, ours_loss), ("the user's model", users, user_loss)):
            print(f"\n{title}, K = {max(args.loops)}: median ms per phase of a step")
            phase_table(args, idx, *build(max(args.loops)), loss_of)
    if args.compiled:
        compiled_table(args, idx)


def eager_table(run: Any, args: argparse.Namespace, idx: torch.Tensor,
                build: Callable[[int], tuple[nn.Module, str | None]],
                loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    reruns = probes.applies_dropout(build(1)[0])
    print(f"{'K':>3}{'plain (ms)':>12}{'probes':>9}" + (f"{'no rerun':>10}" if reruns else "")
          + f"{'wandb.watch':>13}   probes target")
    for n_loops in args.loops:
        plain, loop_module = build(n_loops)
        probed, watched = copy.deepcopy(plain), copy.deepcopy(plain)
        recorder = probes.attach(probed, loop_module)
        run.watch(watched, log="all", log_freq=1)
        plain_step = make_step(plain, idx, loss_of=loss_of)
        t_plain, probes_ratio = timed_against(plain_step, recorded_step(probed, recorder, idx, loss_of),
                                              args.repeats)
        recorder.detach()
        no_rerun = ""
        if reruns:  # the same probes with the dropout noise left in the loop statistics
            probed = copy.deepcopy(plain)
            recorder = probes.attach(probed, loop_module, rerun_without_dropout=False)
            ratio = timed_against(plain_step, recorded_step(probed, recorder, idx, loss_of), args.repeats)[1]
            recorder.detach()
            no_rerun = f"{ratio:>9.3f}x"
        watched_step = make_step(watched, idx, after=lambda i, loss: run.log({"loss": loss.item()}),
                                 loss_of=loss_of)
        watch_ratio = timed_against(plain_step, watched_step, args.repeats)[1]
        run.unwatch(watched)
        verdict = "" if n_loops != 12 else ("ok" if probes_ratio <= TARGET else "MISSED")
        print(f"{n_loops:>3}{t_plain * 1e3:>12.2f}{probes_ratio:>8.3f}x{no_rerun}{watch_ratio:>12.3f}x   "
              f"<= {TARGET} {verdict}")


PHASES = ("forward", "backward", "after_backward", "optimizer", "end_step")


def phase_table(args: argparse.Namespace, idx: torch.Tensor, plain: nn.Module, loop_module: str | None,
                loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    probed = copy.deepcopy(plain)
    recorder = probes.attach(probed, loop_module)
    steppers = {"plain": phase_step(plain, None, idx, loss_of), "probed": phase_step(probed, recorder, idx, loss_of)}
    times: dict[str, list[list[float]]] = {name: [] for name in steppers}
    warmup = 5
    for i in range(warmup + args.repeats):
        for name, stepper in steppers.items():
            phases = stepper(i)
            if i >= warmup:
                times[name].append(phases)
    recorder.detach()
    print(f"{'':>8}" + "".join(f"{phase:>16}" for phase in PHASES) + f"{'step':>10}")
    for name, rows in times.items():
        medians = [statistics.median(column) * 1e3 for column in zip(*rows)]
        print(f"{name:>8}" + "".join(f"{value:>16.2f}" for value in medians)
              + f"{statistics.median(sum(row) for row in rows) * 1e3:>10.2f}")


def phase_step(model: nn.Module, recorder: probes.LoopRecorder | None, idx: torch.Tensor,
               loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[int], list[float]]:
    """A training step that returns the seconds of each of `PHASES` (0 where `recorder` is None)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> list[float]:
        marks = [time.perf_counter()]
        loss = loss_of(model, idx)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if recorder is not None:
            recorder.after_backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if recorder is not None:
            recorder.end_step(i, loss=loss, lr=1e-3)
        marks.append(time.perf_counter())
        return [end - start for start, end in zip(marks, marks[1:])]

    return step


def recorded_step(model: nn.Module, recorder: probes.LoopRecorder, idx: torch.Tensor,
                  loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[int], float]:
    return make_step(model, idx, before=lambda i, loss: recorder.after_backward(),
                     after=lambda i, loss: recorder.end_step(i, loss=loss, lr=1e-3), loss_of=loss_of)


def compiled_table(args: argparse.Namespace, idx: torch.Tensor) -> None:
    print(f"{'K':>3}{'compiled (ms)':>15}{'+ probes':>10}   target")
    for n_loops in args.loops:
        cfg = ModelConfig(d_model=args.d_model, n_layers=2, n_loops=n_loops, seq_len=args.seq_len)
        plain = build_model("looped", cfg)
        probed = copy.deepcopy(plain)
        recorder = probes.attach(probed)
        t_plain, ratio = timed_against(
            make_step(torch.compile(plain), idx),
            make_step(torch.compile(probed), idx, before=lambda i, loss: recorder.after_backward(),
                      after=lambda i, loss: recorder.end_step(i, loss=loss, lr=1e-3)),
            args.repeats)
        recorder.detach()
        verdict = "" if n_loops != 12 else ("ok" if ratio <= COMPILED_TARGET else "MISSED")
        print(f"{n_loops:>3}{t_plain * 1e3:>15.2f}{ratio:>9.3f}x   <= {COMPILED_TARGET} {verdict}")


if __name__ == "__main__":
    main()
