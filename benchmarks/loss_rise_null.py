"""How often does `loss_rise` warn on a loss that never rises? The null its `noise_z` comes
from: a flat loss with per-batch noise and nothing else, replayed through the detector as
training would feed it. At 10 % noise per batch the smoothed loss's noise is 2.2 %, so
the 10 % gap binds only below 4.5 σ and the noise rule decides.

    python benchmarks/loss_rise_null.py [--records 10000] [--repeats 20] [--noise 0.10]

Prints, per `noise_z`, warnings per 10k records under Gaussian noise of the log loss and
under Student-t noise (5 and 10 degrees of freedom, scaled to the same σ: heavier tails
than the detection sets' batch losses, whose excess kurtosis is near 0), and, for
comparison, the 10 % gap alone over the same recent best.
No run is involved, so nothing here is fitted to a scored set.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from loopdiag.detect import LossRise, replay


def flat_records(rng: np.random.Generator, records: int, noise: float, tails: int | None) -> list[dict]:
    draws = rng.standard_normal(records) if tails is None else (
        rng.standard_t(tails, records) / math.sqrt(tails / (tails - 2)))
    losses = 2.0 * np.exp(noise * draws)
    return [{"step": step, "loss": float(loss)} for step, loss in enumerate(losses.tolist(), start=1)]


def warnings_per_10k(detector: LossRise, args: argparse.Namespace, tails: int | None, seed: int) -> float:
    rng = np.random.default_rng(seed)
    total = sum(len(replay(flat_records(rng, args.records, args.noise, tails), [detector]))
                for _ in range(args.repeats))
    return 1e4 * total / (args.records * args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.10, help="σ of the log loss per batch")
    args = parser.parse_args()
    noises = {"Gaussian": None, "t, 10 dof": 10, "t, 5 dof": 5}
    print(f"flat loss, {args.noise:.0%} noise per batch, {args.repeats} × {args.records} records; "
          f"warnings per 10k records")
    print(f"{'rule':34}" + "".join(f"{name:>12}" for name in noises))
    rules = {f"noise_z {z:g}, best of last 100": LossRise(noise_z=z) for z in (6, 7, 8, 9)}
    rules["10 % gap alone, best of last 100"] = LossRise(noise_z=0)
    for name, detector in rules.items():
        row = [warnings_per_10k(detector, args, tails, seed) for seed, tails in enumerate(noises.values())]
        print(f"{name:34}" + "".join(f"{rate:12.2f}" for rate in row), flush=True)


if __name__ == "__main__":
    main()
