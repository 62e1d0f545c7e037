"""Offline replay judges whole columns at once (`replay`, `Detector.replay_columns`); the
events, their order and what each detector judged must be exactly those of feeding the
records one by one, as training does (`update`, then `finish`)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loopdiag.detect import DETECTORS, Event, default_detectors, replay, verdict
from loopdiag.store import read_records
from loopdiag.store.reference import context_free_loss, recorded_losses, reference_run
from loopdiag.detect.trend import mann_kendall_rising_p, rolling_rising_p

pytestmark = pytest.mark.torchless

STUDY = Path(__file__).resolve().parents[1] / "reports" / "flt-stability" / "runs"
# A learning-rate ramp of the transfer corpus whose loss rises before its stream has grown 3×.
LATE_COLLAPSE = (STUDY.parents[1] / "detection" / "transfer" / "runs"
                 / "flt-k04-ramp3-noclip-nocap-s12")
# Runs of the reference study on which each default detector fires at least once.
FIRING_RUNS = ("flt-res-k02-s0-lr0.03", "flt-res-k02-s1-lr0.03", "flt-ai1-k04-s0-lr0.003",
               "flt-ai1-k01-s0-lr0.003", "looped-inject-k02-s0-lr0.003", "flt-ai1-k01-s0-lr0.1",
               "flt-ai1-k02-s1-lr0.1", "flt-ai1-k01-s0-lr0.03", "flt-ai1-k09-s0-lr0.03",
               "flt-ai1-k12-s1-lr0.1", "recurrent-depth-k02-s0-lr0.1")
# Thresholds moved so that every detector fires often, latches and fires again.
EAGER = {
    "loss_spike": {"z": 3.0, "rel_floor": 0.05, "window": 10, "warmup": 5},
    "loss_rise": {"gap": 0.02, "ema_span": 5, "cooldown": 3},
    "slow_divergence": {"window": 20, "alpha": 0.05, "warn_rise": 0.01, "critical_rise": 0.05,
                        "patience": 2, "warmup": 10, "cooldown": 3},
    "gradient_oscillation": {"window": 3, "patience": 2, "cos_threshold": -0.3, "warmup": 5},
    "collapse_plateau": {"window": 10, "stall_window": 20, "gap": 0.05, "alpha": 0.05,
                         "min_resid_growth": 0.01, "stall_resid_growth": 0.05, "warmup": 10},
    "residual_explosion": {"warmup": 5, "baseline_window": 3, "growth_warn": 1.5,
                           "growth_critical": 3.0, "cooldown": 5},
    "residual_blowup": {"horizon": 400, "growth_warn": 2.0, "growth_critical": 5.0},
    "failed_to_train": {"high_loss_window": 10},
    "idle_loops": {"warmup": 0, "patience": 2},
    "dead_loops": {"cooldown": 0},
    "representation_collapse": {"patience": 2, "window": 6, "min_progress": 0.5},
    "vanishing_gradient": {"patience": 2, "window": 4, "gap": 0.02},
    "update_size": {"cooldown": 2},
    "non_finite": {"cooldown": 3},
    # a reference far below a loss that sits above the line drawn from a context-free loss
    "behind_reference": {"context_free_loss": 2.5, "reference_losses": [(1, 1.0)], "cooldown": 3},
}


def online(records, detectors, finished=True):
    """What training sees: every record through `update`, then `finish`."""
    return replay(records, detectors, finished=finished, vectorised=False)


def assert_same(records, make_detectors, finished=True):
    """Online and offline agree on the events (order included), the verdict, and the
    records each detector judged; the events, for callers to check what fired."""
    live, offline = make_detectors(), make_detectors()
    expected = online(records, live, finished)
    got = replay(records, offline, finished=finished)
    assert [e.to_dict() for e in got] == [e.to_dict() for e in expected]
    assert [d.records_judged for d in offline] == [d.records_judged for d in live]
    assert verdict(records, got, finished=finished) == verdict(records, expected, finished=finished)
    return expected


def eventful_run(seed: int, n: int = 700) -> list[dict]:
    """A run on which every default detector has something to judge: loss spikes, a slow
    rise, a plateau with a growing stream, collapsed positions, dead loops, a vanished
    gradient and oscillating gradients, each in two episodes; NaN/Inf values, missing
    keys, None and non-numbers, ragged loop counts and odd steps sprinkled in."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    loss = (2.0 + 3.0 * np.exp(-steps / 50)) * np.exp(rng.normal(0, 0.04, n))
    loss[(steps > 250) & (steps <= 350)] *= np.linspace(1.0, 1.3, 100)  # a slow rise...
    loss[(steps > 350) & (steps <= 450)] *= 1.3  # ...held: a plateau above the best
    loss[(steps > 560) & (steps <= 600)] *= 4  # back above where it started
    loss[steps > 640] *= 4
    resid = 10 * np.exp(rng.normal(0, 0.01, n))
    resid[:15] *= np.geomspace(1, 500, 15) if seed % 2 else 1  # blow-up at the start
    resid[(steps > 300) & (steps <= 450)] *= np.geomspace(1, 40, 150)
    episodes = [(100, 130), (500, 540)]

    def inside(step: int) -> bool:
        return any(start < step <= stop for start, stop in episodes)

    records = []
    for i, step in enumerate(steps.tolist()):
        loops = 4 if rng.random() > 0.1 else 3
        odd = inside(step)
        record = {
            "step": step, "loss": float(loss[i]), "grad_norm": float(1 + rng.random()),
            "lr": 3e-3, "update_ratio": 0.9 if step in (40, 41, 400, 600) else 1e-3,
            "grad_cos": float(-0.8 if odd else rng.normal(0.2, 0.15)),
            "gnorm_autocorr": float(rng.normal(-0.5, 0.1)),
            "sign_flip": 0.4, "gnorm_cv": 0.2,
            "resid_norm": (resid[i] * np.geomspace(1, 3 if odd else 1.1, loops)).tolist(),
            "rel_update": [0.05] + [1e-7 if odd else 0.05] * (loops - 1),
            "act_grad_norm": [1e-9 if odd else 0.1] + [0.1] * (loops - 1),
            "token_corr": [0.5] * (loops - 1) + [1 - 1e-7 if odd else 0.6],
            "grad_norm/wte": 1e-9,
        }
        if step in (150, 151, 200):
            record["loss"] = math.nan if step != 151 else math.inf
        if step in (160, 620):
            record["grad_norm"] = math.inf
        if step % 97 == 0:
            record["loss"] = float(loss[i]) * 4  # a spike
        roll = rng.random()
        if roll < 0.03:
            del record[rng.choice(["loss", "resid_norm", "token_corr", "rel_update",
                                   "act_grad_norm", "grad_cos", "gnorm_autocorr", "step"])]
        elif roll < 0.05:
            record[rng.choice(["loss", "update_ratio", "grad_cos"])] = None
        elif roll < 0.06:
            record["loss"] = "n/a"
        elif roll < 0.07:
            record["resid_norm"] = [None] + record["resid_norm"][1:]
        elif roll < 0.08:
            record["step"] = float(step)
        records.append(record)
    return records


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thresholds", [{}, EAGER], ids=["default", "eager"])
@pytest.mark.parametrize("expected_loss", [None, 1.5])
def test_offline_equals_online_on_synthetic_runs(seed, thresholds, expected_loss):
    assert_same(eventful_run(seed), lambda: default_detectors(expected_loss, **thresholds))


def test_evaluations_between_logged_steps_are_not_replayed():
    # A validation loss at a step the probes did not log is stored as a record of its own,
    # which training never showed the monitor: windows counted in records must not shift.
    records = eventful_run(0)
    with_evaluations = []
    for record in records:
        with_evaluations.append(record)
        if isinstance(record.get("step"), int) and record["step"] % 37 == 0:
            with_evaluations.append({"step": record["step"] + 0.5, "val_loss": 2.5})
    expected = replay(records, default_detectors(), finished=True)
    assert len(expected) > 10
    for vectorised in (True, False):
        assert replay(with_evaluations, default_detectors(), finished=True, vectorised=vectorised) == expected


def test_synthetic_runs_make_every_detector_fire_and_fire_again():
    """Guards the test above: it compares runs where each detector fires, clears and
    fires again after its cooldown."""
    counts = Counter()
    for seed in range(4):
        for expected_loss in (None, 1.5):
            events = assert_same(eventful_run(seed), lambda: default_detectors(expected_loss, **EAGER))
            counts.update(Counter(e.detector for e in events))
    assert {name for name, count in counts.items() if count >= 2} == set(DETECTORS)


def test_offline_equals_online_where_the_noise_sets_the_rise():
    # 20 % batch noise: a rise must clear 8 σ of the smoothed loss's noise, not the 10 % gap
    rng = np.random.default_rng(7)
    records = eventful_run(3)
    for record in records:
        if isinstance(record.get("loss"), float) and math.isfinite(record["loss"]):
            record["loss"] *= float(np.exp(rng.normal(0, 0.2)))
    events = assert_same(records, default_detectors)
    rises = [e for e in events if e.detector in ("loss_rise", "collapse_plateau")
             and "needed_rise" in e.evidence]
    assert rises and any(e.evidence["needed_rise"] > 0.10 for e in rises)


def test_unfinished_and_empty_runs():
    records = eventful_run(0)
    assert_same(records[:300], lambda: default_detectors(2.0), finished=False)
    assert_same([], lambda: default_detectors(2.0))
    assert_same(records[:1], lambda: default_detectors(2.0, **EAGER))
    assert replay(iter(records[:50]), default_detectors()) == replay(records[:50], default_detectors())


def test_records_without_the_keys_a_detector_reads():
    bare = [{"step": step, "loss": 2.0 + 1 / step} for step in range(1, 200)]
    assert_same(bare, default_detectors)
    flattened = [{"step": r.get("step"), "loss": r.get("loss"),
                  **{f"token_corr/loop_{k:02d}": v for k, v in enumerate(r["token_corr"], 1)}}
                 for r in eventful_run(1) if "token_corr" in r]
    assert_same(flattened, lambda: default_detectors(**EAGER))


def test_a_detector_without_a_vectorised_judgement_replays_record_by_record():
    from loopdiag.detect import anchor_detectors

    records = eventful_run(2)
    assert_same(records, lambda: [*anchor_detectors(), *default_detectors()])


def test_offline_equals_online_on_runs_where_each_detector_fires():
    fired = set()
    for run in FIRING_RUNS:
        records = read_records(STUDY / run)
        for expected_loss in (None, 2.0):
            fired |= {e.detector for e in assert_same(records, lambda: default_detectors(expected_loss))}
    # At lr 1e-1 the one-loop `standard` stalls at token statistics long after the same
    # model at 3e-3 (its reference, the suite's gentlest rate) had left them.
    run = STUDY / "standard-k01-s0-lr0.1"
    reference = reference_run(STUDY, {"arch": "standard", "n_loops": 1, "seed": 0, "lr": 0.1})
    curve = recorded_losses(STUDY / reference[0])
    # The study's configs predate the recorded context-free loss (rebuilding it needs
    # torch); the detection corpus's runs, on the same text, record it.
    same_text = json.loads((STUDY.parents[1] / "detection" / "runs" / "flt-k04-lr3e-3-s11"
                            / "config.json").read_text())
    assert same_text["data"]["sha256"] == json.loads((run / "config.json").read_text())["data"]["sha256"]
    events = assert_same(read_records(run), lambda: default_detectors(
        reference[1], context_free_loss=context_free_loss(same_text), reference_losses=curve))
    assert [e.step for e in events if e.detector == "behind_reference"] == [116]
    fired.add("behind_reference")
    # Not on the study: non-finite values, a loss that rose (the synthetic runs have them,
    # and a late collapse of the transfer corpus the rise, below).
    assert fired == set(DETECTORS) - {"non_finite", "slow_divergence", "loss_rise"}


def test_offline_equals_online_on_a_late_collapse():
    records = read_records(LATE_COLLAPSE)
    for expected_loss in (None, 2.0):
        fired = {e.detector for e in assert_same(records, lambda: default_detectors(expected_loss))}
        assert {"loss_rise", "slow_divergence", "residual_explosion"} <= fired


def test_offline_equals_online_where_a_blown_up_stream_warns_on_a_loss_begun_to_rise():
    # a ramp of the minjs corpus warned 20 steps before its onset so
    records = read_records(STUDY.parents[1] / "detection" / "minjs" / "runs"
                           / "flt-k04-ramp3-noclip-nocap-s94")
    for expected_loss in (None, 2.0):
        events = assert_same(records, lambda: default_detectors(expected_loss))
        assert any(e.detector == "residual_blowup" and "begun to rise" in e.message for e in events)


def test_offline_equals_online_where_a_converged_model_stalls_with_a_growing_stream():
    # d_model 256 on a table of numbers: healthy, stalled at half the context-free loss while
    # its stream doubled; the stall rule fires without that loss and is silent with it
    run = STUDY.parents[1] / "detection" / "numeric" / "runs" / "standard-k04-lr3e-3-s98"
    records = read_records(run)
    context_free = context_free_loss(json.loads((run / "config.json").read_text()))
    blind = assert_same(records, lambda: default_detectors())
    assert any(e.detector == "collapse_plateau" and e.severity == "critical" for e in blind)
    for expected_loss in (None, 1.3):
        events = assert_same(records, lambda: default_detectors(expected_loss, context_free_loss=context_free))
        assert not any(e.detector == "collapse_plateau" for e in events)


@pytest.mark.slow
def test_offline_equals_online_on_the_whole_reference_study():
    runs = sorted(path for path in STUDY.iterdir() if path.is_dir())
    assert len(runs) == 384
    for run in runs:
        records = read_records(run)
        for expected_loss in (None, 2.0):
            assert_same(records, lambda: default_detectors(expected_loss))


def test_the_comparison_can_fail():
    """A detector whose vectorised judgement disagrees with its `_check` is caught."""
    from loopdiag.detect import UpdateSize
    from loopdiag.detect.columns import codes

    class Lax(UpdateSize):
        def _judge_columns(self, columns):
            ratio = columns.finite("update_ratio")
            judged = np.isfinite(ratio)
            return (codes(judged, judged & (ratio >= 2 * self.config.ratio_warn)),
                    lambda index: self._check(columns.records[index]))

    with pytest.raises(AssertionError):
        assert_same(eventful_run(0), lambda: [Lax()])
    assert isinstance(replay(eventful_run(0), [UpdateSize()])[0], Event)


@pytest.mark.parametrize("window", [5, 30, 100])
def test_rolling_mann_kendall_equals_the_per_window_test(window):
    rng = np.random.default_rng(window)
    values = np.round(rng.standard_normal(400), 1)  # rounded: many ties
    rolling = rolling_rising_p(values, window)
    assert len(rolling) == len(values) - window + 1
    assert rolling.tolist() == [mann_kendall_rising_p(values[i:i + window])
                                for i in range(len(values) - window + 1)]


@pytest.mark.parametrize("best_window", [20, 21, 100])
def test_a_rise_read_over_whole_columns_gives_the_states_record_by_record_gives(best_window):
    """`RecentRise.run` (a replay's pass over a whole run) and `update` (training, record by
    record) give the same states to the last bit: ties, a loss of 0 or of infinity (no log
    scale to read the noise on), losses near the float maximum, and records fed one by one
    after the pass among them."""
    from loopdiag.detect.symptoms import RecentRise

    rng = np.random.default_rng(5)
    for losses in (np.round(2 + 0.3 * rng.standard_normal(300), 1).tolist(),
                   (2 + 0.3 * rng.standard_normal(250)).tolist(),
                   [*(2 + 0.3 * rng.standard_normal(40)).tolist(), 0.0,
                    *(2 + 0.3 * rng.standard_normal(40)).tolist()],
                   [*(2 + 0.3 * rng.standard_normal(40)).tolist(), math.inf, 2.0],
                   [1e308, 1.7e308, 1.5e308, *(2 + 0.3 * rng.standard_normal(30)).tolist()],
                   [2.0, 1.9], []):
        after = (2 + 0.3 * rng.standard_normal(30)).tolist()
        one_by_one, whole = (RecentRise(20, 0.1, best_window, batch_cap=1.5) for _ in range(2))
        expected = [one_by_one.update(loss, step) for step, loss in enumerate(losses + after)]
        run = whole.run(losses, list(range(len(losses))))
        assert run.risen.tolist() == [state.risen for state in expected[:len(losses)]]
        got = [*run, *(whole.update(loss, len(losses) + step) for step, loss in enumerate(after))]
        assert got == expected


def test_rises_alike_share_the_noise_they_read():
    """A replay reads the loss's noise once for every rise of the same window and span
    (`RecordColumns.rise_run`); each rise's states are still its own."""
    from loopdiag.detect.columns import RecordColumns
    from loopdiag.detect.symptoms import RecentRise

    rng = np.random.default_rng(6)
    records = [{"step": step, "loss": 2 + 0.3 * value}
               for step, value in enumerate(rng.standard_normal(400).tolist(), start=1)]
    records[50]["loss"] = math.nan
    columns = RecordColumns(records)
    kept = [record for record in records if math.isfinite(record["loss"])]
    for make in (lambda: RecentRise(20, 0.1, batch_cap=1.5), lambda: RecentRise(20, 0.0),
                 lambda: RecentRise(20, 0.1, floor=2.1), lambda: RecentRise(20, 0.1, best_window=40),
                 lambda: RecentRise(10, 0.1)):
        alone = make().run([record["loss"] for record in kept], [record["step"] for record in kept])
        assert [*columns.rise_run(make())] == [*alone]
