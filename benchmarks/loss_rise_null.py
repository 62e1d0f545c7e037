"""How often does `loss_rise` warn on a loss that never rises? The null its `noise_z` comes
from: a flat loss with per-batch noise and nothing else, replayed through the detector as
training would feed it. At 10 % noise per batch the smoothed loss's noise is 2.2 %, so
the 10 % gap binds only below 4.5 σ and the noise rule decides.

    python benchmarks/loss_rise_null.py [--records 10000] [--repeats 20] [--noise 0.10]

Prints, per `noise_z`, warnings per 10k records under Gaussian noise of the log loss and
under Student-t noise (5 and 10 degrees of freedom, scaled to the same σ: heavier tails
than the detection sets' batch losses, whose excess kurtosis is near 0), and, for
comparison, the 10 % gap alone over the same recent best.

Then the loss symptom `residual_explosion` warns with once the stream has tripled
(`Symptoms.current`: the smoothed loss 10 % above the run's best, not the recent one), and,
for comparison, the same with 8 σ of the loss's noise as well. Here the loss first falls 3×
to its level over some 30 records, as a run's does, so that the best is not the noisy EMA
of the first few records; only records after 70 (the detector's warm-up and baseline)
count, one episode per 20-record cooldown.
No run is involved, so nothing here is fitted to a scored set.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from loopdiag.detect import LossRise, replay
from loopdiag.detect.symptoms import RISE_NOISE_Z, Symptoms

JUDGED_AFTER = 70  # residual_explosion's warm-up (50) and baseline window (20)
GAP = 0.10  # its loss symptom's gap, the labels'
COOLDOWN = 20


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


def run_best_episodes_per_10k(noise_z: float, args: argparse.Namespace, seed: int) -> float:
    """Episodes of the smoothed loss standing 10 % and `noise_z` σ of its noise above the
    run's best (the loss symptom alone, no stream) per 10k judged records of a loss that
    falls to a flat noisy level."""
    rng = np.random.default_rng(seed)
    episodes = judged = 0
    for _ in range(args.repeats):
        symptoms = Symptoms(GAP, reads_rise=True, positions=False)
        fall = 1 + 2 * np.exp(-np.arange(args.records) / 10)
        losses = 2.0 * fall * np.exp(args.noise * rng.standard_normal(args.records))
        last = -COOLDOWN
        for step, loss in enumerate(losses.tolist(), start=1):
            symptoms.update({"step": step, "loss": loss})
            if step <= JUDGED_AFTER:
                continue
            judged += 1
            above, noise = symptoms.loss.above_best(), symptoms.rise_state.noise
            needed = max(GAP, noise_z * (noise or 0.0))
            if step - last >= COOLDOWN and above is not None and above >= needed:
                episodes, last = episodes + 1, step
    return 1e4 * episodes / judged


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
    print("\nthe loss symptom over the run's best, after a fall, Gaussian noise; episodes per 10k records")
    for noise_z in (0.0, RISE_NOISE_Z):
        name = f"10 % and {noise_z:g} σ, run's best" if noise_z else "10 % alone, run's best"
        print(f"{name:34}{run_best_episodes_per_10k(noise_z, args, 0):12.2f}", flush=True)


if __name__ == "__main__":
    main()
