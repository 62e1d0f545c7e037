"""Forward+backward step time, measured side by side in one process.

    python benchmarks/step_time.py [--repeats 30] [--d-model 64]

Pairs (targets): flt / looped at K = 4 and 12 (<= 1.05x); looped (K loops of L blocks) /
standard (K*L distinct blocks) (<= 1.10x). Each repeat times every model of a pair once, in
alternating order, so machine noise hits both sides alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopdiag.models import ModelConfig, build_model


def step_seconds(model, idx: torch.Tensor) -> float:
    start = time.perf_counter()
    _, loss = model(idx, targets=idx)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def median_times(models: list, idx: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
    for model in models:
        for _ in range(warmup):
            step_seconds(model, idx)
    samples: list[list[float]] = [[] for _ in models]
    for r in range(repeats):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            samples[i].append(step_seconds(models[i], idx))
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq_len))
    print(f"d_model={args.d_model} L=2 batch={args.batch} seq={args.seq_len} threads={torch.get_num_threads()}")
    print(f"{'pair':<34}{'a (ms)':>9}{'b (ms)':>9}{'a/b':>8}{'target':>9}")
    for n_loops, target, pair in [(4, 1.05, "flt"), (12, 1.05, "flt"), (4, 1.10, "standard"), (12, 1.10, "standard")]:
        cfg = ModelConfig(d_model=args.d_model, n_layers=2, n_loops=n_loops, seq_len=args.seq_len)
        if pair == "flt":
            names, models = ("flt", "looped"), [build_model("flt", cfg), build_model("looped", cfg)]
        else:
            names, models = ("looped", "standard"), [build_model("looped", cfg), build_model("standard", cfg)]
        a, b = median_times(models, idx, args.repeats)
        verdict = "ok" if a / b <= target else "MISSED"
        label = f"{names[0]} / {names[1]}  K={n_loops}"
        print(f"{label:<34}{a * 1e3:>9.2f}{b * 1e3:>9.2f}{a / b:>8.3f}{'<= ' + str(target):>9}  {verdict}")


if __name__ == "__main__":
    main()
