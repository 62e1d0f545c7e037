"""Collapse detectors on synthetic runs: silent on healthy ones, firing at the right step on
broken ones, steady (no flapping) in between; the anchor rules, verdicts and onsets."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from loopdiag.detect import (
    DETECTORS,
    CollapsePlateau,
    Detector,
    DetectorConfig,
    Event,
    GradientOscillation,
    LossRise,
    LossSpike,
    MegatronSpike,
    NonFinite,
    OlmoSpike,
    ResidualExplosion,
    SlowDivergence,
    ZScore30,
    anchor_detectors,
    default_detectors,
    ground_truth_onset,
    replay,
    verdict,
)
from loopdiag.detect.base import UNJUDGED, Finding, finite_scalar
from loopdiag.detect.trend import mann_kendall_rising_p, sen_line

pytestmark = pytest.mark.torchless  # also run on Python 3.12 / 3.13 without torch

LOOPS = 4
AUTOCORR_WINDOW = 32  # steps the recorder's gnorm_autocorr is computed over
ONSET = 300  # where the synthetic collapse begins
EMA_ALPHA = 2 / 21  # the default onset span of 20 records


# --- synthetic runs ---------------------------------------------------------------------

def healthy_resid(steps: np.ndarray, n: int) -> np.ndarray:
    """√d = 8 at init, ×4 as the zero-initialised branches switch on (settled by step
    ~60), then a slow healthy drift of +10 % over the run."""
    return 8 * (1 + 3 * (1 - np.exp(-steps / 15))) * (1 + 0.1 * steps / n)


def increment_autocorr(norms: np.ndarray) -> np.ndarray:
    """What the recorder logs (`probes.stats.window_stats`): lag-1 autocorrelation of the
    increments of the last AUTOCORR_WINDOW norms; NaN until the window is full."""
    out = np.full(len(norms), math.nan)
    for t in range(AUTOCORR_WINDOW - 1, len(norms)):
        d = np.diff(norms[t - AUTOCORR_WINDOW + 1:t + 1])
        d = d - d.mean()
        out[t] = float((d[1:] * d[:-1]).sum() / (d * d).sum())
    return out


def make_run(n=600, seed=0, loss_factor=None, resid_factor=None, cos_mean=None, noise=0.05):
    """Records of a healthy run (noisy decaying loss, 5 % multiplicative noise; residual
    norms that grow early then settle; white-noise gradient statistics), optionally broken
    by multiplying the loss or residual norm, or shifting the mean gradient cosine."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    loss = (2.0 + 3.5 * np.exp(-steps / 60)) * np.exp(rng.normal(0, noise, n))
    resid = healthy_resid(steps, n) * np.exp(rng.normal(0, 0.01, n))
    if loss_factor is not None:
        loss = loss * loss_factor(steps)
    if resid_factor is not None:
        resid = resid * resid_factor(steps)
    cos = rng.normal(0.2, 0.15, n) + (0 if cos_mean is None else cos_mean(steps) - 0.2)
    cos = np.clip(cos, -1, 1)
    gnorm = 1 + 0.2 * rng.standard_normal(n)
    autocorr = increment_autocorr(gnorm)
    return [{
        "step": int(step), "loss": float(loss[i]), "lr": 3e-3, "grad_norm": float(abs(gnorm[i])),
        "update_ratio": 1e-3, "grad_cos": math.nan if i == 0 else float(cos[i]),
        "sign_flip": float(0.45 - 0.2 * cos[i]), "gnorm_cv": 0.2,
        "gnorm_autocorr": float(autocorr[i]),
        "resid_norm": (resid[i] * np.linspace(0.9, 1.0, LOOPS)).tolist(),
        "rel_update": [0.05] * LOOPS, "act_grad_norm": [0.1] * LOOPS, "token_corr": [0.3] * LOOPS,
    } for i, step in enumerate(steps)]


def after(steps: np.ndarray, start: int) -> np.ndarray:
    return np.clip(steps - start, 0, None)


def collapse_run(n=500, seed=1):
    """Collapse from ONSET: loss rises to 1.5× and plateaus, the residual norm grows
    e-fold every 30 steps, and gradients oscillate from 20 steps before."""
    return make_run(n, seed,
                    loss_factor=lambda s: 1 + 0.5 * (1 - np.exp(-after(s, ONSET) / 40)),
                    resid_factor=lambda s: np.exp(after(s, ONSET) / 30),
                    cos_mean=lambda s: np.where(s >= ONSET - 20, -0.7, 0.2))


def slow_rise_run(n=700, seed=2):
    """Healthy until step 400, then the loss creeps up 0.1 % per step."""
    return make_run(n, seed, loss_factor=lambda s: 1 + 0.001 * after(s, 400))


def with_spikes(records, factor, at_steps):
    return [dict(r, loss=r["loss"] * factor) if r["step"] in at_steps else r for r in records]


def losses_and_steps(records):
    return [r["loss"] for r in records], [r["step"] for r in records]


def fired(events, detector=None, severity=None):
    return [e for e in events if detector in (None, e.detector) and severity in (None, e.severity)]


@pytest.fixture(scope="module")
def collapse():
    records = collapse_run()
    return records, replay(records, default_detectors())


# --- every detector on a healthy run ----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_detectors_silent_on_healthy_runs(seed):
    events = replay(make_run(seed=seed), default_detectors())
    assert events == [], [e.message for e in events]


def test_warmup_baseline_is_why_early_residual_growth_is_not_an_explosion():
    records = make_run()
    assert fired(replay(records, [ResidualExplosion()])) == []
    # Baselined at the very start, the healthy ×4 switch-on growth would look explosive.
    early = ResidualExplosion(warmup=0, baseline_window=1)
    assert fired(replay(records, [early]), severity="info")


# --- each detector on its failure ---------------------------------------------------------

def test_non_finite_fires_immediately_and_once_per_episode():
    records = [{"step": s, "loss": 2.0, "grad_norm": 1.0} for s in range(1, 60)]
    records[0]["loss"] = math.nan  # step 1: no warm-up
    for r in records[20:25]:
        r["grad_norm"] = math.inf  # one episode of five records
    records[40]["loss"] = -math.inf  # after more than `cooldown` clear records
    events = replay(records, [NonFinite()])
    assert [(e.step, e.severity) for e in events] == [(1, "critical"), (21, "critical"),
                                                      (41, "critical")]
    assert "grad_norm (inf)" in events[1].message


def test_loss_spike_catches_a_3x_spike_at_its_step():
    events = replay(with_spikes(make_run(), 3.0, {300}), [LossSpike()])
    assert [(e.step, e.severity) for e in events] == [(300, "warn")]
    assert events[0].evidence["ratio"] == pytest.approx(3.0, rel=0.15)


def test_loss_spike_relative_floor_ignores_tiny_mad_wobbles():
    # Nearly noiseless loss: a 5 % wobble scores a huge robust z but is no spike.
    records = with_spikes(make_run(noise=0.001), 1.05, {300})
    assert replay(records, [LossSpike()]) == []
    assert replay(records, [LossSpike(rel_floor=0.01)])  # the floor is what kept it quiet


def test_gradient_oscillation_fires_after_window_and_patience(collapse):
    _, events = collapse
    oscillation = fired(events, "gradient_oscillation")
    # cos drops to -0.7 at step 280; the 8-record mean reaches -0.5 once 7 records are in
    # (step 286) and must hold for 5 records.
    assert [(e.step, e.severity) for e in oscillation] == [(290, "warn")]
    assert oscillation[0].evidence["mean_grad_cos"] < -0.5


def test_gradient_oscillation_from_autocorrelation_alone():
    records = [{"step": s, "gnorm_autocorr": -0.95 if s > 100 else -0.5} for s in range(1, 200)]
    events = replay(records, [GradientOscillation()])
    # The 8-record mean passes -0.85 at step 107 (7 of 8 records oscillating), + 4 records.
    assert [e.step for e in events] == [111]
    assert events[0].evidence["mean_grad_cos"] is None
    assert events[0].severity == "info"  # no loss: nothing says the descent stopped


@pytest.mark.parametrize("loss, severity", [
    (lambda s: 5.0 * 0.998 ** s, "info"),  # falls 4 % per 20 records throughout
    (lambda s: 5.0 * 0.998 ** min(s, 60), "warn"),  # flat from step 60: stalled
    (lambda s: 3.0 * (1.2 if s > 80 else 1.0), "warn"),  # 20 % above its best
])
def test_gradient_oscillation_warns_only_when_the_loss_stops_falling(loss, severity):
    records = [{"step": s, "loss": loss(s), "gnorm_autocorr": -0.95 if s > 100 else -0.5}
               for s in range(1, 200)]
    events = replay(records, [GradientOscillation()])
    assert [(e.step, e.severity) for e in events] == [(111, severity)]
    assert (events[0].evidence["symptom"] is None) == (severity == "info")


def test_a_lone_loss_spike_is_information_and_a_lasting_one_warns():
    lone = replay(with_spikes(make_run(), 1.5, {300}), [LossSpike()])
    assert [(e.step, e.severity) for e in lone] == [(300, "info")]
    lasting = replay(with_spikes(make_run(), 1.5, {300, 301}), [LossSpike()])
    assert [(e.step, e.severity) for e in lasting] == [(300, "info"), (301, "warn")]
    assert lasting[1].evidence["records_in_a_row"] == 2
    assert [e.severity for e in replay(with_spikes(make_run(), 2.5, {300}), [LossSpike()])] == ["warn"]


def test_residual_explosion_over_steps_warns_then_escalates(collapse):
    records, events = collapse
    explosion = fired(events, "residual_explosion")
    steps = np.array([r["step"] for r in records])
    clean = healthy_resid(steps, len(steps)) * np.exp(after(steps, ONSET) / 30)
    baseline = np.median(healthy_resid(steps, len(steps))[50:70])

    def first_crossing(factor):  # + 2: the rolling median of 5 lags by two records
        return int(steps[np.argmax(clean / baseline >= factor)]) + 2

    assert [e.severity for e in explosion] == ["warn", "critical"]
    assert abs(explosion[0].step - first_crossing(3.0)) <= 2
    assert abs(explosion[1].step - first_crossing(10.0)) <= 2
    assert explosion[1].evidence["growth"] >= 10


# Without a loss there is no symptom: growth alone, however large, is information.
@pytest.mark.parametrize("per_loop, severity", [(1.6, "info"), (2.5, "info")])
def test_residual_explosion_over_loops(per_loop, severity):
    # the last loop stays at 8 (no growth over steps); loop 1 shrinks so that the stream
    # grows `per_loop`× per loop from step 101 on
    records = [{"step": s, "resid_norm": [8.0 * (per_loop if s > 100 else 1.0) ** (k - 5)
                                          for k in range(6)]} for s in range(1, 150)]
    events = replay(records, [ResidualExplosion()])
    # the median of 5 records follows at step 103
    assert [(e.step, e.severity) for e in events] == [(103, severity)]
    assert events[0].evidence["per_loop_growth"] == pytest.approx(per_loop)
    assert events[0].evidence["growth"] == pytest.approx(1.0)


def test_slow_divergence_fires_before_the_loss_is_visibly_worse():
    records = slow_rise_run()
    onset = ground_truth_onset(*losses_and_steps(records))
    events = replay(records, [SlowDivergence()])
    assert [e.severity for e in events] == ["warn", "critical"]
    assert 400 < events[0].step < onset - 20
    # the blind spot of a 6σ-over-128-steps rule: the trend inflates its σ
    assert replay(records, [OlmoSpike()]) == []


def test_slow_divergence_ignores_a_lone_spike():
    assert replay(with_spikes(make_run(), 3.0, {300}), [SlowDivergence()]) == []


def test_loss_rise_warns_at_the_step_the_run_visibly_failed():
    records = slow_rise_run()
    onset = ground_truth_onset(*losses_and_steps(records))
    events = replay(records, [LossRise()])
    # the onset's rule, on the first record it holds: at the onset, or before it when the
    # smoothed loss dips back under the line once more (a brief dip stays within the cooldown)
    assert [e.severity for e in events] == ["warn"]
    assert 400 < events[0].step <= onset
    assert ground_truth_onset(*losses_and_steps(records[:events[0].step - 1])) is None
    evidence = events[0].evidence
    assert evidence["smoothed_loss"] >= 1.1 * evidence["best"]
    assert evidence["best_step"] < onset
    assert f"{evidence['best']:.4g} (step {evidence['best_step']})" in events[0].message


def test_loss_rise_quiet_on_noisy_healthy_runs():
    # 7 % per-record noise: near the noisiest detection-set healthy runs (shifted: 5.9–7.5 %)
    for seed in range(3):
        assert replay(make_run(seed=seed, noise=0.07), [LossRise()]) == []


def test_a_loss_rise_that_recovers_warns_once_and_is_no_collapse():
    bump = lambda s: 1 + 0.4 * ((s > 300) & (s <= 340))  # noqa: E731
    records = make_run(loss_factor=bump)
    events = replay(records, [LossRise()], finished=True)
    assert [e.severity for e in events] == ["warn"]
    assert 301 < events[0].step <= 305  # within the bump's first records
    assert ground_truth_onset(*losses_and_steps(records)) is None
    assert verdict(records, events, finished=True)["status"] == "stable"


def flat_noisy_run(n=3000, noise=0.10, seed=0, rise_from=None, rise=0.0):
    """A loss flat at 2 with `noise` per batch (log-normal), optionally stepping up by
    `rise` from step `rise_from` on."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    loss = 2.0 * np.exp(rng.normal(0, noise, n))
    if rise_from is not None:
        loss = loss * np.where(steps >= rise_from, 1 + rise, 1.0)
    return [{"step": int(step), "loss": float(value)} for step, value in zip(steps, loss)]


def test_loss_rise_reads_a_noisy_loss_against_its_noise():
    records = flat_noisy_run()
    # the fixed gap over the run's deepest dip: a flat loss this noisy rises 10 % above it
    assert replay(records, [LossRise(noise_z=0, best_window=len(records))])
    assert replay(records, [LossRise()]) == []
    events = replay(flat_noisy_run(rise_from=2000, rise=0.4), [LossRise()])
    assert [e.severity for e in events] == ["warn"]
    assert 2000 < events[0].step <= 2020
    evidence = events[0].evidence
    assert evidence["needed_rise"] > evidence["thresholds"]["gap"]  # the noise set the bar
    assert 0.015 < evidence["noise"] < 0.03  # 10 % per batch, × √(α / (2 − α)) ≈ 0.22
    assert "σ of its noise" in events[0].message


def test_loss_rise_reads_a_solved_model_from_a_tenth_of_the_context_free_loss():
    # A model that solved its data (context-free loss 2.0, line 0.2) at 0.02 nats: its loss
    # rising by half to 0.03 is a few more confident misses, still far under the line.
    solved = flat_noisy_run(n=1000, noise=0.02, rise_from=500, rise=0.5)
    for record in solved:
        record["loss"] /= 100
    assert [e.step for e in replay(solved, [LossRise()])]  # read from its best: a rise
    for vectorised in (True, False):
        assert replay(solved, [LossRise(context_free_loss=2.0)], vectorised=vectorised) == []
    # Back to 0.4, above the line: warned, read from the line, once the smoothed loss (a
    # batch counted at most 1.5× it: ~4.8 % a record) has climbed past it
    relapsed = flat_noisy_run(n=1000, noise=0.02, rise_from=500, rise=19.0)
    for record in relapsed:
        record["loss"] /= 100
    events = replay(relapsed, [LossRise(context_free_loss=2.0)])
    assert [e.severity for e in events] == ["warn"] and 540 < events[0].step <= 560
    assert events[0].evidence["rise_from"] == pytest.approx(0.2)
    assert events[0].evidence["smoothed_loss"] >= 1.1 * 0.2
    assert "10% of the context-free loss" in events[0].message
    # A model that has not solved its data is read from its best, as without it
    unsolved = flat_noisy_run(rise_from=2000, rise=0.4)
    assert ([e.step for e in replay(unsolved, [LossRise(context_free_loss=3.0)])]
            == [e.step for e in replay(unsolved, [LossRise()])])


def test_collapse_plateau_does_not_call_a_noisy_flat_loss_stuck():
    # a flat loss at 20 % batch noise, a stream that drifts up 6 % per 30 records (21 % per
    # 100: under the stall rule's 25 %)
    records = flat_noisy_run(noise=0.20)
    for index, record in enumerate(records):
        record["resid_norm"] = [10.0 * 1.06 ** (index / 30)] * LOOPS
    # 10 % over the run's deepest dip: stuck, and critical with the drifting stream
    old_rule = CollapsePlateau(noise_z=0, best_window=len(records))
    assert "critical" in {e.severity for e in replay(records, [old_rule])}
    assert replay(records, [CollapsePlateau()]) == []


def test_loss_rise_without_noise_to_read_judges_the_gap_alone():
    # a user's loss with no log scale (≤ 0), and one with no noise: no crash
    assert replay([{"step": step, "loss": -2.0 + 0.01 * step} for step in range(1, 80)], [LossRise()]) == []
    records = [{"step": step, "loss": value} for step, value in enumerate([1.0] * 60 + [2.0] * 30, start=1)]
    events = replay(records, [LossRise()])
    assert [(e.step, e.severity) for e in events] == [(63, "warn")]  # 2× capped at 1.5×
    assert events[0].evidence["needed_rise"] == 0.10
    assert "σ" not in events[0].message


def test_one_bad_batch_never_makes_a_rise():
    # 10× one batch: uncapped, it would lift the smoothed loss 86 % above its best
    assert replay(with_spikes(make_run(), 10.0, {300}), [LossRise()]) == []


def test_collapse_plateau_critical_when_stuck_while_residual_rises(collapse):
    records, events = collapse
    plateau = fired(events, "collapse_plateau")
    onset = ground_truth_onset(*losses_and_steps(records))
    # same EMA as the onset: stuck from `onset`, critical once stuck for 30 records
    assert [(e.step, e.severity) for e in plateau] == [(onset + 29, "critical")]
    assert plateau[0].evidence["resid_growth"] > 1.05


def test_collapse_plateau_only_warns_without_residual_growth_or_data():
    stuck = make_run(n=500, loss_factor=lambda s: 1 + 0.5 * (1 - np.exp(-after(s, ONSET) / 40)))
    events = replay(stuck, [CollapsePlateau()])
    assert [e.severity for e in events] == ["warn"]
    assert "not rising" in events[0].message
    no_resid = [{k: v for k, v in r.items() if k != "resid_norm"} for r in stuck]
    events = replay(no_resid, [CollapsePlateau()])
    assert [e.severity for e in events] == ["warn"]
    assert "too few residual norms" in events[0].message


def test_trend_statistics_match_scipy():
    rng = np.random.default_rng(3)
    x = np.arange(100, 200, dtype=float)
    for drift in (0.0, 2e-4, 1e-3):
        y = 2 + drift * (x - 100) + 0.05 * rng.standard_normal(len(x))
        slope, start = sen_line(x, y)
        reference = stats.theilslopes(y, x)
        assert slope == pytest.approx(reference.slope)
        assert start == pytest.approx(reference.intercept + reference.slope * x[0])
        tau, p_two_sided = stats.kendalltau(x, y, method="asymptotic")
        p_rising = p_two_sided / 2 if tau > 0 else 1 - p_two_sided / 2
        # scipy has no continuity correction: equal to a few percent
        assert mann_kendall_rising_p(y) == pytest.approx(p_rising, rel=0.05, abs=1e-12)


def stopped_learning_run(resid_per_100: float, n=400, seed=4):
    """Loss drops fast, then sits at 3.3 (a healthy model would go on to ~2); the residual
    norm grows by `resid_per_100` every 100 steps."""
    rng = np.random.default_rng(seed)
    noise = np.exp(rng.normal(0, 0.03, n))
    return [{"step": s, "loss": float((3.3 + 2.2 * math.exp(-s / 10)) * noise[s - 1]),
             "resid_norm": [8.0, 40.0 * resid_per_100 ** (s / 100)]} for s in range(1, n + 1)]


def test_collapse_plateau_catches_a_model_that_stopped_learning():
    events = replay(stopped_learning_run(resid_per_100=2.0), [CollapsePlateau()])
    assert [e.severity for e in events] == ["critical"]
    assert "stopped learning" in events[0].message
    # the loss settles by step ~60; a stall takes 100 records of < 1 % progress after that,
    # a little more while the noisy EMA still sets small new lows
    assert 160 <= events[0].step <= 200
    assert events[0].evidence["progress"] < 0.01 and events[0].evidence["resid_growth"] > 1.9


def test_collapse_plateau_silent_on_convergence_with_a_steady_stream():
    assert replay(stopped_learning_run(resid_per_100=1.02), [CollapsePlateau()]) == []


def test_collapse_plateau_reads_a_stall_against_what_token_frequencies_give():
    # the run sits at 3.3 with its stream doubling per 100 records: at that data's
    # context-free loss (or within 10 % of it) the stall is the collapse, far below it the
    # model learned from its input and converged
    run = stopped_learning_run(resid_per_100=2.0)
    for context_free in (3.3, 3.5):
        events = replay(run, [CollapsePlateau(context_free_loss=context_free)])
        assert [e.severity for e in events] == ["critical"]
    assert replay(run, [CollapsePlateau(context_free_loss=3.75)]) == []
    assert replay(run, [CollapsePlateau(context_free_loss=6.6)]) == []


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, "3.3"])
def test_collapse_plateau_rejects_a_context_free_loss_that_is_no_loss(bad):
    with pytest.raises(ValueError, match="context_free_loss"):
        CollapsePlateau(context_free_loss=bad)


# --- severity and hysteresis --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LevelConfig(DetectorConfig):
    cooldown: int = 3


class Level(Detector):
    """Test detector: v ≥ 1 warns, v ≥ 2 is critical, a missing v is unjudged."""

    name = "level"
    config_class = LevelConfig

    def _reset_state(self) -> None:
        pass

    def _check(self, record):
        v = finite_scalar(record, "v")
        if v is None:
            return UNJUDGED
        if v >= 1:
            return Finding("critical" if v >= 2 else "warn", f"v = {v}", {"v": v})
        return None


def level_events(values, **config):
    records = [{"step": i} if v is None else {"step": i, "v": v} for i, v in enumerate(values)]
    return [(e.step, e.severity) for e in replay(records, [Level(**config)])]


def test_no_flapping_when_crossing_the_threshold_repeatedly():
    assert level_events([1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1]) == [(0, "warn")]


def test_escalation_fires_and_lower_severity_stays_quiet():
    assert level_events([1, 1, 2, 1, 2, 0, 1]) == [(0, "warn"), (2, "critical")]


def test_fires_again_after_cooldown_clear_records():
    assert level_events([1, 0, 0, 0, 1, 0, 0, 1]) == [(0, "warn"), (4, "warn")]


def test_unjudged_records_do_not_clear_the_condition():
    assert level_events([1, 0, None, None, None, 0, 1]) == [(0, "warn")]


def test_warmup_and_cooldown_zero():
    assert level_events([1, 1, 1, 0], warmup=2) == [(2, "warn")]
    assert level_events([1, 1, 0, 1], cooldown=0) == [(0, "warn"), (1, "warn"), (3, "warn")]


def test_residual_explosion_does_not_flap_around_its_threshold():
    # after step 300 the residual norm hovers at 2.7× / 3.3× its baseline in blocks of 6
    hover = lambda s: np.where(s > 300, np.where((s // 6) % 2 == 0, 2.7, 3.3), 1.0)  # noqa: E731
    events = replay(make_run(n=500, resid_factor=hover), [ResidualExplosion()])
    assert [e.severity for e in events] == ["info"]


def test_repeated_loss_spikes_within_cooldown_fire_once():
    records = with_spikes(make_run(), 3.0, {300, 303, 306, 350})
    assert [e.step for e in replay(records, [LossSpike()])] == [300, 350]


# --- robustness: NaN, missing keys, online == offline -----------------------------------

def test_nan_and_inf_outside_the_loss_are_skipped():
    rng = np.random.default_rng(5)
    records = make_run()
    for record in records:
        if rng.random() < 0.05:
            record.update(grad_cos=math.nan, gnorm_autocorr=math.inf, sign_flip=math.nan)
        if rng.random() < 0.05:
            record["resid_norm"] = [math.nan, None, math.inf, math.nan]
    assert replay(records, default_detectors()) == []


def test_missing_keys_never_crash_and_stay_silent():
    rng = np.random.default_rng(6)
    records = [{k: v for k, v in r.items() if k == "step" or rng.random() > 0.3}
               for r in make_run()]
    records += [{}, {"step": 601}, {"step": 602, "loss": "n/a", "resid_norm": "n/a"}]
    assert replay(records, default_detectors()) == []
    replay(records, anchor_detectors())


def test_flattened_per_loop_columns_read_like_lists(collapse):
    records, events = collapse
    flat = [{k: v for k, v in r.items() if not isinstance(v, list)}
            | {f"{k}/loop_{i + 1:02d}": x for k, v in r.items() if isinstance(v, list)
               for i, x in enumerate(v)} for r in records]
    assert "resid_norm/loop_04" in flat[0] and "resid_norm" not in flat[0]
    assert [(e.step, e.detector) for e in replay(flat, default_detectors())] \
        == [(e.step, e.detector) for e in events]


def test_online_updates_equal_offline_replay(collapse):
    records, offline = collapse
    detectors = default_detectors()
    online = [event for record in records for d in detectors for event in d.update(record)]
    as_json = lambda events: [json.dumps(e.to_dict()) for e in events]  # noqa: E731 (NaN-safe)
    assert as_json(online) == as_json(offline)
    assert as_json(replay(records, detectors)) == as_json(offline)  # replay resets


def test_counts_are_in_records_whatever_the_log_interval(collapse):
    records, events = collapse
    every_10 = [dict(r, step=10 * r["step"]) for r in records]
    assert [(e.step, e.detector, e.severity) for e in replay(every_10, default_detectors())] \
        == [(10 * e.step, e.detector, e.severity) for e in events]


def test_events_are_plain_json(collapse):
    records, events = collapse
    events = events + replay(records, anchor_detectors())

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int, float, bool, type(None))

    for event in events:
        assert plain(event.to_dict()), event
        json.dumps(event.to_dict())
        assert event.message.endswith(".")
    with pytest.raises(ValueError, match="severity"):
        Event(step=1, detector="x", severity="fatal", message="m", evidence={})


# --- configuration ------------------------------------------------------------------------

def test_default_detectors_overrides():
    detectors = default_detectors(loss_spike={"z": 8}, residual_explosion={"warmup": 10})
    assert [d.name for d in detectors] == list(DETECTORS)
    by_name = {d.name: d for d in detectors}
    assert by_name["loss_spike"].config.z == 8.0
    assert isinstance(by_name["loss_spike"].config.z, float)
    assert by_name["residual_explosion"].config.warmup == 10
    assert by_name["slow_divergence"].config == SlowDivergence().config


@pytest.mark.parametrize("overrides, match", [
    ({"loss_spikes": {"z": 8}}, r"unknown detector.*'loss_spikes'.*choose from"),
    ({"loss_spike": {"zz": 8}}, r"loss_spike: unknown threshold.*'zz'.*valid: .*\bz\b"),
    ({"loss_spike": {"z": -1}}, r"loss_spike: z must be > 0"),
    ({"loss_spike": {"z": "8"}}, r"loss_spike: z must be a finite number"),
    ({"loss_spike": {"window": 2.5}}, r"loss_spike: window must be an integer"),
    ({"loss_spike": {"window": True}}, r"loss_spike: window must be an integer"),
    ({"slow_divergence": {"warn_rise": 0.2}}, r"warn_rise <= critical_rise"),
    ({"loss_rise": {"gap": 0.0}}, r"loss_rise: gap must be > 0"),
    ({"loss_rise": {"ema_span": 0}}, r"loss_rise: ema_span must be >= 1"),
    ({"loss_rise": {"batch_cap": 1.0}}, r"loss_rise: batch_cap must be > 1"),
    ({"loss_rise": {"best_window": 10}}, r"loss_rise: best_window must be >= 20"),
    ({"loss_rise": {"noise_z": -1}}, r"loss_rise: noise_z must be >= 0"),
    ({"loss_rise": {"context_free_margin": 1.0}}, r"loss_rise: context_free_margin must be in \[0, 1\)"),
    ({"loss_rise": {"context_free_loss": 0.0}}, r"loss_rise: context_free_loss"),
    ({"vanishing_gradient": {"context_free_margin": -0.1}}, r"vanishing_gradient: context_free_margin"),
    ({"gradient_oscillation": {"autocorr_threshold": -0.4}}, r"white noise"),
    ({"non_finite": 3}, r"non_finite: thresholds must be a mapping"),
], ids=["detector", "threshold", "range", "string", "float-int", "bool", "order", "gap",
        "span", "cap", "window", "noise-z", "margin", "context-free", "symptom-margin", "autocorr", "mapping"])
def test_default_detectors_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        default_detectors(**overrides)


def test_detector_constructor_checks_its_config():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossSpike().config.z = 3  # windows are sized from the config once
    with pytest.raises(TypeError, match="either a config"):
        LossSpike(LossSpike.config_class(), z=3)
    with pytest.raises(TypeError, match="LossSpikeConfig"):
        LossSpike(SlowDivergence.config_class())


# --- anchor rules ---------------------------------------------------------------------------

def test_megatron_misses_a_3x_spike_that_loss_spike_catches():
    records = with_spikes(make_run(), 3.0, {300})
    assert replay(records, [MegatronSpike()]) == []
    assert [e.step for e in replay(records, [LossSpike()])] == [300]


def test_megatron_reference_max_is_frozen_after_its_sample():
    losses = [5.0] * 50 + [1.0] * 100 + [60.0, 1.0, 49.0]
    records = [{"step": s, "loss": v} for s, v in enumerate(losses)]
    records[10]["loss"] = 400.0  # inside the sample: never flagged, sets the maximum
    events = replay(records, [MegatronSpike()])
    assert events == []
    records[10]["loss"] = 5.0
    events = replay(records, [MegatronSpike()])
    # 10 × max(first 100) = 50: 60 flagged, 49 not, though the loss has long been 1.0
    assert [e.step for e in events] == [150]
    assert events[0].evidence["reference_max"] == 5.0


def test_3sigma_30_rule_fires_on_healthy_noise_olmo_does_not():
    records = make_run()
    assert len(replay(records, [ZScore30()])) >= 3
    assert replay(records, [OlmoSpike()]) == []


def test_olmo_rule_needs_a_full_window_and_catches_a_3x_spike():
    records = with_spikes(make_run(), 3.0, {100, 300})
    assert [e.step for e in replay(records, [OlmoSpike()])] == [300]  # 100: window not full


# --- verdicts -------------------------------------------------------------------------------

def test_verdict_stable_and_interrupted():
    records = make_run()
    events = replay(records, default_detectors())
    result = verdict(records, events, finished=True)
    assert result["status"] == "stable"
    assert result["step"] is result["signal"] is result["first_warning_step"] is None
    assert result["last_loss"] == records[-1]["loss"]
    assert result["best_loss"] == min(r["loss"] for r in records)
    assert verdict(records, events, finished=False)["status"] == "interrupted"
    json.dumps(result)


def test_verdict_collapsed(collapse):
    records, events = collapse
    result = verdict(records, events, finished=True)
    first_critical = fired(events, severity="critical")[0]
    assert result["status"] == "collapsed"
    assert (result["step"], result["signal"]) == (first_critical.step, first_critical.detector)
    assert result["evidence"] == first_critical.to_dict()["evidence"]
    assert result["first_warning_step"] == 290 < result["step"]
    # a run stopped because it collapsed is a collapse, not an interruption
    assert verdict(records, events, finished=False)["status"] == "collapsed"
    # events read back from the store are plain dicts
    assert verdict(records, [e.to_dict() for e in events], finished=True) == result


def transient_collapse(final_loss=2.5, context_free=3.3, n=300):
    """A run whose positions are identical (token correlation 1) while its loss sits at the
    context-free level for 80 steps, which then trains out of it to `final_loss`."""
    records = make_run(n=n)
    for record in records:
        step = record["step"]
        stuck = step <= 80
        record["loss"] = (context_free if stuck else
                          final_loss + (context_free - final_loss) * math.exp(-(step - 80) / 30)
                          ) * record["loss"] / (2.0 + 3.5 * math.exp(-step / 60))
        record["token_corr"] = [0.3] * (LOOPS - 1) + [1.0 if stuck else 0.3]
    return records


def test_a_run_that_trains_out_of_a_collapse_is_recovered_not_collapsed():
    records = transient_collapse()
    events = replay(records, default_detectors(context_free_loss=3.3), finished=True)
    first = fired(events, severity="critical")[0]
    assert first.detector == "representation_collapse" and first.step <= 80
    result = verdict(records, events, finished=True, context_free_loss=3.3)
    assert (result["status"], result["mechanism"], result["step"], result["signal"]) == (
        "recovered", "representation", first.step, "representation_collapse")
    # the identical positions and stalled loss are what it recovered from, in its own words
    assert result["message"] == first.message
    # nothing to measure a recovery against: the collapse stands
    assert verdict(records, events, finished=True)["status"] == "collapsed"
    # a run stopped (or cut off) after collapsing never showed that it recovered
    assert verdict(records, events, finished=False, context_free_loss=3.3)["status"] == "collapsed"


def test_a_collapse_is_not_recovered_short_of_the_context_free_loss_or_behind_the_reference():
    # 5 % below what token frequencies give: identical positions could come that close
    records = transient_collapse(final_loss=0.95 * 3.3)
    events = replay(records, default_detectors(context_free_loss=3.3), finished=True)
    assert verdict(records, events, finished=True, context_free_loss=3.3)["status"] == "collapsed"
    # trained out of it, but ended far behind what the model should reach: the collapse is why
    records = transient_collapse()
    events = replay(records, default_detectors(expected_loss=1.5, context_free_loss=3.3), finished=True)
    assert "failed_to_train" in {e.detector for e in fired(events, severity="critical")}
    result = verdict(records, events, finished=True, context_free_loss=3.3)
    assert (result["status"], result["signal"]) == ("collapsed", "representation_collapse")
    # it trained out of it and then rose 10 % above its best again: not a recovery
    records = transient_collapse()
    for record in records[-60:]:
        record["loss"] *= 1.3
    events = replay(records, default_detectors(context_free_loss=3.3), finished=True)
    assert verdict(records, events, finished=True, context_free_loss=3.3)["status"] == "collapsed"


def test_verdict_diverged():
    records = make_run(n=300)
    for r in records[250:]:
        r["loss"] = math.nan
    events = replay(records, default_detectors())
    result = verdict(records, events, finished=True)
    assert (result["status"], result["step"], result["signal"]) == ("diverged", 251, "non_finite")
    assert math.isnan(result["last_loss"])
    assert verdict(records, [], finished=False)["status"] == "diverged"  # from the records alone


def test_verdict_collapse_then_divergence_reports_the_first_failure(collapse):
    records, _ = collapse
    records = [dict(r, loss=math.nan) if r["step"] > 450 else r for r in records]
    events = replay(records, default_detectors())
    result = verdict(records, events, finished=True)
    assert result["status"] == "diverged"
    assert result["signal"] != "non_finite" and result["step"] < 400


# --- ground-truth onset ---------------------------------------------------------------------

def test_onset_none_for_healthy_and_transient_runs():
    assert ground_truth_onset(*losses_and_steps(make_run())) is None
    spiky = with_spikes(make_run(), 3.0, {300, 301, 302})
    assert ground_truth_onset(*losses_and_steps(spiky)) is None
    recovered = [2.0] * 100 + [3.0] * 50 + [2.0] * 100
    assert ground_truth_onset(recovered, range(len(recovered))) is None
    assert ground_truth_onset([], []) is None


def test_onset_of_a_step_rise_follows_the_ema():
    losses = [2.0] * 200 + [2.6] * 100
    steps = [10 * (i + 1) for i in range(len(losses))]  # logged every 10 steps
    # EMA after k records at 2.6: 2 + 0.6(1 - (1-α)^k) ≥ 2.2  ⇔  (1-α)^k ≤ 2/3
    k = math.ceil(math.log(2 / 3) / math.log(1 - EMA_ALPHA))
    assert ground_truth_onset(losses, steps) == steps[200 + k - 1]


def test_onset_of_non_finite_tail():
    losses, steps = losses_and_steps(make_run())
    losses[400:] = [math.nan] * (len(losses) - 400)
    assert ground_truth_onset(losses, steps) == steps[400]
    plateau = [2.0] * 100 + [3.0] * 100 + [math.inf] * 20
    onset = ground_truth_onset(plateau, range(len(plateau)))
    assert 100 < onset < 110  # the plateau came first


def test_onset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="length"):
        ground_truth_onset([1.0, 2.0], [1])


# --- residual blow-up --------------------------------------------------------------------------

def blowup_records(growth_per_step: float, steps: int = 60, start: float = 5.7):
    return [{"step": step, "loss": 3.0, "resid_norm": [start * growth_per_step ** step] * 2}
            for step in range(1, steps + 1)]


def test_residual_blowup_silent_on_healthy_early_growth():
    from loopdiag.detect import ResidualBlowup

    # grows 25x (the most a healthy benchmark run showed) and settles
    records = [{"step": s, "resid_norm": [5.7 * min(25.0, 1.2 ** s)]} for s in range(1, 300)]
    assert replay(records, [ResidualBlowup()]) == []


def test_residual_blowup_fires_in_the_first_steps_and_escalates_with_a_symptom():
    from loopdiag.detect import ResidualBlowup

    # a loss that fell to 2.0 by step 10, then rose to 3.0: a symptom from about step 20
    records = [{**record, "loss": 2.0 + abs(record["step"] - 10) / 10}
               for record in blowup_records(1.3)]
    warn, critical = replay(records, [ResidualBlowup()])
    assert (warn.severity, critical.severity) == ("warn", "critical")
    # 1.3^s passes 100x at s = 18 (the 5-record median lags 2 records), too early to tell a
    # stall; the loss has begun to rise by then, far past its (zero) noise, and the smoothed
    # loss is 10 % above its best from about step 23; 1000x at s = 27
    assert 18 <= warn.step <= 25 and 27 <= critical.step <= 30
    assert "begun to rise" in warn.message and warn.evidence["symptom"] is None
    assert critical.evidence["initial_step"] == 1 and critical.evidence["growth"] >= 1000
    assert "above its best" in critical.message


def noisy_losses(seed: int, steps: int, level: float = 3.0, noise: float = 0.05) -> list[float]:
    """A flat loss with Gaussian batch noise of `noise` × `level`."""
    rng = np.random.default_rng(seed)
    return (level * (1 + noise * rng.standard_normal(steps))).tolist()


def test_a_blown_up_stream_warns_once_the_loss_begins_to_rise_before_the_labels_gap():
    from loopdiag.detect import ResidualBlowup

    # the stream 150x its first record throughout; the noisy loss flat for 40 records, then
    # climbing 0.4 % a record: 10 % above its best only after ~25 records of the climb
    losses = noisy_losses(0, 70)
    losses = [loss * (1 + 0.004 * max(0, step - 40)) for step, loss in enumerate(losses, 1)]
    records = [{"step": step, "loss": loss, "resid_norm": [10.0 if step == 1 else 1500.0]}
               for step, loss in enumerate(losses, 1)]
    events = [e for e in replay(records, [ResidualBlowup()]) if e.severity != "info"]
    assert events and events[0].severity == "warn" and "begun to rise" in events[0].message
    assert 41 < events[0].step < 65
    assert events[0].evidence["rising"] and events[0].evidence["symptom"] is None
    # nothing critical without the labels' 10 % or identical positions
    assert all(e.severity == "warn" for e in events)


def test_a_flat_noisy_loss_has_rarely_begun_to_rise():
    from loopdiag.detect.symptoms import Symptoms

    symptoms, episodes, last = Symptoms(0.10, reads_rise=True), 0, -20
    for step, loss in enumerate(noisy_losses(2, 20_000, level=2.0, noise=0.08), 1):
        symptoms.update({"step": step, "loss": loss})
        if symptoms.rising() and step - last >= 20:  # one episode per detector cooldown
            episodes, last = episodes + 1, step
    assert episodes <= 4  # 8 σ of the noise: well under one per 10k records


def test_a_lone_spike_on_a_blown_up_stream_is_no_rise():
    from loopdiag.detect import ResidualBlowup

    losses = noisy_losses(1, 70)
    losses[40] *= 1.5  # one batch at the cap
    records = [{"step": step, "loss": loss, "resid_norm": [10.0 if step == 1 else 1500.0]}
               for step, loss in enumerate(losses, 1)]
    assert [e.severity for e in replay(records, [ResidualBlowup()])] in ([], ["info"])


def test_residual_blowup_warns_a_run_that_diverges_in_its_first_records():
    from loopdiag.detect import ResidualBlowup

    # the stream ×30 and the loss ×2 a step from the first record: diverged by step 3
    records = [{"step": step, "loss": 5.5 * 2.0 ** (step - 1), "resid_norm": [11.0 * 30.0 ** (step - 1)]}
               for step in range(1, 8)]
    first = replay(records, [ResidualBlowup()])[0]
    assert first.step <= 4 and first.severity == "warn" and "above its best" in first.message


def test_a_solved_models_loss_moving_under_the_solved_line_is_no_symptom():
    from loopdiag.detect import ResidualBlowup

    # A model that solved its data (context-free loss 2.0, line 0.2) at 0.02 nats, at 0.03
    # from step 15: 50 % above its best, still far under the line; its stream grows 1.3× a
    # step (1000× by step 27).
    solved = [{**record, "loss": 0.02 if record["step"] < 15 else 0.03} for record in blowup_records(1.3)]
    assert "critical" in {event.severity for event in replay(solved, [ResidualBlowup()])}
    for vectorised in (True, False):
        events = replay(solved, [ResidualBlowup(context_free_loss=2.0), ResidualExplosion(context_free_loss=2.0)],
                        vectorised=vectorised)
        assert {event.severity for event in events} <= {"info"}
    # Relapsed to 0.6, above the line: the symptom, read from the line
    relapsed = [{**record, "loss": 0.02 if record["step"] < 15 else 0.6} for record in blowup_records(1.3)]
    critical = replay(relapsed, [ResidualBlowup(context_free_loss=2.0)])[-1]
    assert critical.severity == "critical"
    assert "above 0.2, the line its best 0.02 got under" in critical.message


def test_a_stream_growing_while_the_loss_falls_is_information():
    from loopdiag.detect import ResidualBlowup

    # the non-looped model at a high lr: the stream grows 10,000x while the loss falls
    records = [{**record, "loss": 5.0 * 0.98 ** record["step"]} for record in blowup_records(1.3)]
    events = replay(records, [ResidualBlowup(), ResidualExplosion()])
    assert [(event.detector, event.severity) for event in events] == [("residual_blowup", "info")]
    assert "while the loss still falls" in events[0].message


def test_a_stream_growing_while_the_loss_stalls_is_information_until_a_symptom():
    from loopdiag.detect import ResidualBlowup

    # a flat loss: growth passes 100x at step 18, a stall is known once 25 losses exist
    events = replay(blowup_records(1.3), [ResidualBlowup()])
    assert [(event.step, event.severity) for event in events] == [(25, "info")]
    assert "stopped falling" in events[0].message
    # the same growth, then the loss steps 20 % up at step 41: it has begun to rise once 3 of
    # its last 5 losses are up (a loss without noise), a warning; a symptom once the
    # smoothed loss is 10 % above its best
    rising = [{**record, "loss": 3.6 if record["step"] > 40 else 3.0}
              for record in blowup_records(1.3)]
    events = replay(rising, [ResidualBlowup()])
    assert [(event.step, event.severity) for event in events][:2] == [(25, "info"), (43, "warn")]
    assert "begun to rise" in events[1].message and "no noise" in events[1].message
    assert events[-1].severity == "critical" and "above its best" in events[-1].message


def test_residual_blowup_stops_judging_after_its_horizon():
    from loopdiag.detect import ResidualBlowup

    # a long run whose stream grows slowly past 100x after the first 70 records
    records = [{"step": s, "resid_norm": [5.7 * 1.05 ** s]} for s in range(1, 400)]
    assert replay(records, [ResidualBlowup()]) == []


def test_residual_blowup_bad_thresholds():
    with pytest.raises(ValueError, match="residual_blowup"):
        default_detectors(residual_blowup={"growth_warn": 10.0, "growth_critical": 5.0})


# --- update size -------------------------------------------------------------------------------

def update_records(ratios):
    return [{"step": step, "loss": 3.0, "lr": 0.1, "update_ratio": ratio}
            for step, ratio in enumerate(ratios, start=1)]


def test_update_size_silent_on_healthy_steps():
    from loopdiag.detect import UpdateSize

    # the first steps of Adam at a high but healthy learning rate, then a settled run
    assert replay(update_records([0.16, 0.15, 0.12, 0.1] + [0.01] * 300), [UpdateSize()]) == []


def test_update_size_warns_on_the_first_step_once():
    from loopdiag.detect import UpdateSize

    events = replay(update_records([4.8, 1.0, 0.5, 0.3, 0.2]), [UpdateSize()])
    (event,) = events  # latched: the steps right after stay quiet
    assert (event.step, event.severity) == (1, "warn")
    assert event.evidence["update_ratio"] == 4.8 and event.evidence["lr"] == 0.1
    assert "4.8× their norm" in event.message


def test_update_size_skips_records_without_the_ratio():
    from loopdiag.detect import UpdateSize

    assert replay([{"step": 1, "loss": 3.0}, {"step": 2, "update_ratio": float("nan")}], [UpdateSize()]) == []


def test_update_size_bad_threshold():
    with pytest.raises(ValueError, match="update_size: ratio_warn must be > 0"):
        default_detectors(update_size={"ratio_warn": 0.0})


# --- packaging --------------------------------------------------------------------------------

def test_public_api():
    import loopdiag.detect as detect

    assert sorted(detect.__all__) == sorted([
        "DETECTORS", "MECHANISMS", "SEVERITIES", "STATUSES", "BehindReference",
        "BehindReferenceConfig", "CollapsePlateau",
        "CollapsePlateauConfig", "DeadLoops", "DeadLoopsConfig", "IdleLoops", "IdleLoopsConfig", "FailedToTrain",
        "FailedToTrainConfig", "FoundryHighLoss", "RepresentationCollapse",
        "RepresentationCollapseConfig", "VanishingGradient", "VanishingGradientConfig",
        "ResidualBlowup", "ResidualBlowupConfig",
        "Detector", "DetectorConfig", "Event", "GradientOscillation",
        "GradientOscillationConfig", "LossRise", "LossRiseConfig", "LossSpike", "LossSpikeConfig", "MegatronSpike",
        "NonFinite", "NonFiniteConfig", "OlmoSpike", "ResidualExplosion",
        "ResidualExplosionConfig", "SlowDivergence", "SlowDivergenceConfig", "UpdateSize",
        "UpdateSizeConfig", "ZScore30",
        "anchor_detectors", "default_detectors", "ground_truth_onset", "replay", "verdict"])
    assert all(hasattr(detect, name) for name in detect.__all__)
    assert list(DETECTORS) == ["non_finite", "update_size", "representation_collapse",
                               "vanishing_gradient", "dead_loops", "idle_loops", "residual_blowup",
                               "residual_explosion", "gradient_oscillation", "loss_spike",
                               "loss_rise", "slow_divergence", "collapse_plateau", "behind_reference",
                               "failed_to_train"]


def test_detectors_import_neither_torch_nor_the_rest_of_loopdiag():
    """They judge saved runs on a laptop: numpy and scipy only."""
    package = Path(__file__).parents[1] / "loopdiag" / "detect"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] != "torch", module.name
                assert name.split(".")[0] != "loopdiag" or name.startswith("loopdiag.detect"), \
                    module.name
