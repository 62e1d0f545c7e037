"""How often does the stall rule misread a loss's trend under batch noise? The null the
stall rule's estimator was chosen on: a loss that falls by a set fraction over the rule's
20-record window (0: flat, a stalled run), with Gaussian noise of the log loss per batch and
nothing else, fed record by record to `LossTrack` as training would feed it.

    python benchmarks/stall_null.py [--records 2000] [--repeats 20]

Prints, per noise level and true fall, how often `LossTrack.progress` reads "still learning"
(≥ `MIN_PROGRESS`, 2 %) and, side by side, how often the comparison of two medians of 5
losses 20 records apart would (the stall rule's estimator until the Theil–Sen line
replaced it), with the ratio of their spreads. On a flat loss a reading ≥ 2 % is a stalled
run passed as learning; on a loss falling 4 % per window a reading under 2 % is a learning
run read as stalled. No run is involved, so nothing here is fitted to a scored set.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from loopdiag.detect.symptoms import MIN_PROGRESS, STALL_EXTRA, LossTrack

WINDOW = 20


def readings(losses: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(the stall rule's progress, the two-medians comparison) at every record with enough
    history."""
    track = LossTrack(window=WINDOW)
    line, medians = [], []
    for step, loss in enumerate(losses, start=1):
        track.update({"step": step, "loss": loss})
        progress = track.progress()
        if progress is None:
            continue
        recent = losses[step - WINDOW - STALL_EXTRA:step]
        line.append(progress)
        medians.append(1 - statistics.median(recent[-5:]) / statistics.median(recent[:5]))
    return np.array(line), np.array(medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.repeats} × {args.records} records; share of readings ≥ {MIN_PROGRESS:.0%} "
          f"(still learning)")
    print(f"{'noise':>6} {'true fall':>10} {'Theil–Sen line':>15} {'medians of 5':>13} "
          f"{'spread ratio':>13}")
    for noise in (0.01, 0.02, 0.04, 0.08):
        for fall in (0.0, 0.04):
            per_record = (1 - fall) ** (1 / WINDOW)
            line, medians = [], []
            for _ in range(args.repeats):
                trend = 2.0 * per_record ** np.arange(args.records)
                losses = trend * np.exp(noise * rng.standard_normal(args.records))
                got = readings(losses.tolist())
                line.append(got[0])
                medians.append(got[1])
            line, medians = np.concatenate(line), np.concatenate(medians)
            print(f"{noise:6.0%} {fall:10.0%} {np.mean(line >= MIN_PROGRESS):15.3f} "
                  f"{np.mean(medians >= MIN_PROGRESS):13.3f} "
                  f"{np.std(line) / np.std(medians):13.2f}", flush=True)


if __name__ == "__main__":
    main()
