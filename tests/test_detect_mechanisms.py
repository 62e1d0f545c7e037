"""The looped collapse read from its mechanism (representation, gradient, dead loops), failure
to train against a reference, and the verdicts that name them."""

from __future__ import annotations

import math

import numpy as np
import pytest

import loopdiag
from benchmark_scripts import loaded
from loopdiag.detect import (
    DeadLoops,
    FailedToTrain,
    FoundryHighLoss,
    RepresentationCollapse,
    ResidualExplosion,
    VanishingGradient,
    default_detectors,
    replay,
    verdict,
)

pytestmark = pytest.mark.torchless  # also run on Python 3.12 / 3.13 without torch

LOOPS = 12


def looped_run(collapse: bool, steps: int = 150, seed: int = 0) -> list[dict]:
    """A 12-loop run. Both pass through the unigram phase (positions alike, steps 5-30);
    the collapsed one keeps every position identical from step 3, its loops 3-12 idle and its
    gradient dying on the way back, while its loss sits at 3.3; the healthy one leaves the
    phase and learns to 2.3."""
    rng = np.random.default_rng(seed)
    records = []
    for step in range(1, steps + 1):
        noise = math.exp(rng.normal(0, 0.03))
        if collapse:
            loss = (3.3 + 2.2 * math.exp(-step / 3)) * noise
            decorrelation = 0.9 if step < 3 else abs(rng.normal(0, 4e-7))
            updates = [math.nan, 0.2, *[1e-7] * (LOOPS - 2)]
            ratio = 1e-3 * 10 ** (-step / 5)
        else:
            loss = (2.3 + 3.2 * math.exp(-step / 25)) * noise
            # closest approach 3e-5 at step 20, as a healthy tiny looped model's
            decorrelation = 3e-5 * math.exp(((step - 20) / 8) ** 2) if step < 60 else 0.5
            updates = [math.nan, *[0.3 / k for k in range(2, LOOPS + 1)]]
            ratio = 0.5
        grads = [ratio * 1e-3, *[1e-3] * (LOOPS - 1)]
        records.append({"step": step, "loss": loss, "token_corr": [1 - min(decorrelation, 0.9)] * LOOPS,
                        "rel_update": updates, "act_grad_norm": grads, "grad_norm/wte": ratio * 1e-2,
                        "resid_norm": [8.0] * LOOPS})
    return records


def test_representation_collapse_warns_early_and_is_critical_once_the_loss_stalls():
    events = replay(looped_run(collapse=True), [RepresentationCollapse()])
    warn, critical = events
    assert (warn.severity, critical.severity) == ("warn", "critical")
    assert warn.step == 7  # identical from step 3, five records in a row
    assert critical.step <= 40  # 20 records held, the loss flat by then
    assert critical.evidence["collapsed_from_loop"] == 1 and critical.evidence["since_step"] == 3
    assert "loops 3–12 change nothing" in critical.message.lower()
    assert "since step 3" in critical.message and "the loss stalled" in critical.message
    assert "gradient at the embedding" in critical.message


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_sparser_log_waits_as_many_steps_for_a_collapse_not_as_many_records(vectorised):
    every_fifth = looped_run(collapse=True)[4::5]  # steps 5, 10, ...: identical from the first
    (warn, *_) = replay(every_fifth, [RepresentationCollapse()], vectorised=vectorised)
    assert (warn.severity, warn.step, warn.evidence["records"]) == ("warn", 10, 2)
    # one record is never enough, however far apart the records are
    every_fiftieth = looped_run(collapse=True)[49::50]
    assert replay(every_fiftieth[:1], [RepresentationCollapse()], vectorised=vectorised) == []
    assert replay(every_fiftieth[:2], [RepresentationCollapse()], vectorised=vectorised)[0].step == 100
    # positions identical for 4 steps, shorter than the patience, warn at no log interval
    dipped = looped_run(collapse=False)
    for record in dipped[17:21]:  # steps 18–21
        record["token_corr"] = [1 - 1e-7] * LOOPS
    for every in (1, 2, 3, 5):
        assert replay(dipped[every - 1::every], [RepresentationCollapse()], vectorised=vectorised) == []


def test_the_unigram_phase_of_a_healthy_run_is_not_a_collapse():
    healthy = looped_run(collapse=False)
    assert replay(healthy, default_detectors()) == []
    assert verdict(healthy, [], finished=True)["status"] == "stable"


def test_dead_loops_name_the_first_idle_loop_and_are_information():
    events = replay(looped_run(collapse=True), [DeadLoops()])
    (event,) = events
    assert event.severity == "info" and event.evidence["dead_from_loop"] == 3
    assert event.message.startswith("Loops 3–12 change nothing")


def test_idle_loops_name_where_the_fixed_point_sets_in_after_the_early_phase():
    from loopdiag.detect import IdleLoops

    # loops 1-4 move the stream by 30 %, loops 5-12 by 0.3 %: stable, mostly idle
    records = [{"step": s, "loss": 3.0, "rel_update": [float("nan"), *[0.3] * 3, *[0.003] * 8]}
               for s in range(1, 200)]
    (event,) = replay(records, [IdleLoops()])
    assert event.severity == "info" and event.evidence["dead_from_loop"] == 5
    assert event.step == 51  # the first record after its 50-record warm-up (held >= 20)
    assert event.message.startswith("Loops 5–12 move the stream by < 1% each")
    only_last = [{**record, "rel_update": [float("nan"), *[0.3] * 10, 0.003]} for record in records]
    assert replay(only_last, [IdleLoops()])[0].message.startswith("Loop 12 moves the stream by < 1% for")
    for record in records:
        record["rel_update"][-1] = 0.05  # the last loop still moves it: not idle
    assert replay(records, [IdleLoops()]) == []


def test_vanishing_gradient_alone_is_information_and_critical_with_a_loss_symptom():
    records = looped_run(collapse=False)
    for record in records:  # FLT-like: a contracting loop map while the model learns
        record["act_grad_norm"] = [1e-12, *[1e-3] * (LOOPS - 1)]
    assert {event.severity for event in replay(records, [VanishingGradient()])} == {"info"}
    for record in records[80:]:  # the loss climbs back up
        record["loss"] *= 1 + (record["step"] - 80) / 40
    severities = [event.severity for event in replay(records, [VanishingGradient()])]
    assert severities == ["info", "critical"]


def test_a_gradient_that_underflowed_to_zero_is_said_as_such():
    records = looped_run(collapse=True)
    for record in records:  # float32 underflow: the gradient at loop 1 is exactly 0
        record["act_grad_norm"] = [0.0, *[1e-3] * (LOOPS - 1)]
    (event,) = [e for e in replay(records, [VanishingGradient()]) if e.severity == "info"]
    assert "(now exactly 0: none reaches it)" in event.message and "0e+00" not in event.message
    (collapse,) = [e for e in replay(records, [RepresentationCollapse()]) if e.severity == "critical"]
    assert "no gradient reaches loop 1 (exactly 0)" in collapse.message and "0e+00" not in collapse.message


def test_failed_to_train_is_judged_at_the_end_against_a_known_reference():
    stuck = [{"step": s, "loss": 3.2 + 2.0 * math.exp(-s / 5)} for s in range(1, 200)]
    assert replay(stuck, [FailedToTrain(expected_loss=2.4)]) == []  # mid-run: not yet
    (event,) = replay(stuck, [FailedToTrain(expected_loss=2.4)], finished=True)
    assert (event.step, event.severity) == (199, "critical")
    assert "ended" in event.message and "33% above the 2.4" in event.message
    assert event.evidence["expected_loss"] == 2.4
    assert event.evidence["thresholds"]["gap"] == 0.1  # one level, as every detector's
    # the same run judged without a reference: it did get below its first losses
    assert replay(stuck, [FailedToTrain()], finished=True) == []
    # a run still well above its reference half-way, that ends within 10 % of it
    catching_up = [{"step": s, "loss": 2.45 + 3.0 * math.exp(-s / 30)} for s in range(1, 200)]
    assert replay(catching_up, [FailedToTrain(expected_loss=2.4)], finished=True) == []


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_reference_that_learned_nearly_everything_is_not_a_relative_target(vectorised):
    """Two-digit addition: the one-loop model ended at 0.0056 nats, looped models that
    solved the task too at 0.013-0.03. Against a reference under a tenth of the
    context-free loss (1.765) a run is behind from 10 % above that tenth on."""
    def settled(end: float) -> list[dict]:
        return [{"step": s, "loss": end + 1.5 * math.exp(-s / 10)} for s in range(1, 150)]

    floor, reference = 1.765, 0.0056
    solved = FailedToTrain(expected_loss=reference, context_free_loss=floor)
    assert replay(settled(0.03), [solved], finished=True, vectorised=vectorised) == []
    assert replay(settled(0.19), [solved], finished=True, vectorised=vectorised) == []
    # a run that did not learn the carries is still behind, and says by how much
    (event,) = replay(settled(0.2), [solved], finished=True, vectorised=vectorised)
    assert event.severity == "critical" and "35.7× the 0.0056 this model should reach" in event.message
    # without the context-free loss nothing says what is left to learn: relative, as before
    (event,) = replay(settled(0.019), [FailedToTrain(expected_loss=reference)], finished=True,
                      vectorised=vectorised)
    assert "3.39× the 0.0056" in event.message
    # a reference above a tenth of the context-free loss keeps the relative 10 %
    text = FailedToTrain(expected_loss=0.4, context_free_loss=3.3)
    assert len(replay(settled(0.45), [text], finished=True, vectorised=vectorised)) == 1
    assert replay(settled(0.43), [text], finished=True, vectorised=vectorised) == []


@pytest.mark.parametrize("vectorised", [False, True])
def test_failed_to_train_says_whether_the_loss_was_still_falling(vectorised):
    """A slow learner cut off by the budget and a stuck run both end above the reference;
    the verdict is the same, the advice is not."""
    late = [{"step": s, "loss": 3.0 if s < 150 else 3.0 - 0.012 * (s - 150)} for s in range(1, 200)]
    (event,) = replay(late, [FailedToTrain(expected_loss=2.0)], finished=True, vectorised=vectorised)
    assert "still falling" in event.message and "more steps may reach it" in event.message
    assert event.evidence["still_falling"] is True
    # the same loss with every position one vector at the end: more steps cannot help
    identical = [{**record, "token_corr": [0.5, 1.0]} for record in late]
    identical[-1]["token_corr"] = [0.5, 0.9]  # the last record has it, and decides
    (event,) = replay(identical, [FailedToTrain(expected_loss=2.0)], finished=True, vectorised=vectorised)
    assert "more steps may reach it" in event.message and not event.evidence["identical_positions"]
    identical[-1]["token_corr"] = [1.0, math.nan]  # not recorded: the one before decides
    identical[-2]["token_corr"] = [0.5, 1.0]
    (event,) = replay(identical, [FailedToTrain(expected_loss=2.0)], finished=True, vectorised=vectorised)
    assert "every position carries the same vector: no more steps take it below" in event.message
    assert "more steps may reach it" not in event.message and event.evidence["identical_positions"]
    stuck = [{"step": s, "loss": 3.0 + 0.01 * math.sin(s)} for s in range(1, 200)]
    (event,) = replay(stuck, [FailedToTrain(expected_loss=2.0)], finished=True, vectorised=vectorised)
    assert "still falling" not in event.message and event.evidence["still_falling"] is False


def worse_than_at_start(steps: int = 260) -> list[dict]:
    """Losses that fall a little, then climb above anything seen in the first 100 records."""
    return [{"step": s, "loss": 5.5 + 0.3 * math.sin(s) if s <= 120 else 6.5} for s in range(1, steps)]


def test_failed_to_train_without_a_reference_uses_the_high_loss_rule():
    (event,) = replay(worse_than_at_start(), [FailedToTrain()])
    assert event.severity == "critical" and event.step == 201
    assert "never got below where it started" in event.message
    flat = [{"step": s, "loss": 5.5 + 0.3 * math.sin(s)} for s in range(1, 260)]
    assert replay(flat, [FailedToTrain()]) == []  # the rule sees only a loss above its start


@pytest.mark.parametrize("vectorised", [False, True])
def test_without_a_reference_an_oversized_step_means_the_run_failed_to_train(vectorised):
    """A learning rate that rewrote the weights at step 2, then a loss that converges at
    2.75: without a reference only the step tells that run from a healthy one."""
    def run(first_ratios: list[float]) -> list[dict]:
        ratios = [*first_ratios, *[0.01] * (199 - len(first_ratios))]
        return [{"step": s, "loss": 2.75 + 2.0 * math.exp(-s / 10), "update_ratio": ratio}
                for s, ratio in zip(range(1, 200), ratios)]

    too_high = run([0.3, 5.0, 1.2])
    assert replay(too_high, [FailedToTrain()], vectorised=vectorised) == []  # judged at the end
    (event,) = replay(too_high, [FailedToTrain()], finished=True, vectorised=vectorised)
    assert (event.step, event.severity) == (199, "critical")
    assert "At step 2 one step moved the shared weights by 5×" in event.message
    assert event.evidence["update_step"] == 2 and event.evidence["update_ratio"] == 5.0
    assert verdict(too_high, [event], finished=True)["status"] == "failed_to_train"
    # a healthy high learning rate's first steps (0.16 at most in the development runs)
    assert replay(run([0.16, 0.1]), [FailedToTrain()], finished=True, vectorised=vectorised) == []
    # with a reference the loss judges: this run ends within 10 % of 2.6
    assert replay(too_high, [FailedToTrain(expected_loss=2.6)], finished=True,
                  vectorised=vectorised) == []
    with pytest.raises(ValueError, match="oversized_update must be > 0"):
        FailedToTrain(oversized_update=0)


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_loss_stalled_at_the_context_free_loss_failed_to_train_with_or_without_reference(vectorised):
    """The FLT paper's collapse without a reference to show it: a run whose loss settles at
    what token frequencies alone give (3.26 nats on the embedded text)."""
    floor = 3.26
    stuck = [{"step": s, "loss": 3.22 + 2.0 * math.exp(-s / 5)} for s in range(1, 200)]
    assert replay(stuck, [FailedToTrain()], finished=True, vectorised=vectorised) == []
    for detector in (FailedToTrain(context_free_loss=floor),
                     FailedToTrain(context_free_loss=floor, expected_loss=2.4)):
        (event,) = replay(stuck, [detector], finished=True, vectorised=vectorised)
        assert (event.step, event.severity) == (199, "critical")
        assert "stalled at 3.22, within 1% of 3.26" in event.message
        assert "token frequencies alone" in event.message
        assert event.evidence["context_free_loss"] == floor
        # with a reference the event also says how far behind it the run ended
        assert ("34% above the 2.4" in event.message) == (detector.config.expected_loss == 2.4)
    assert replay(stuck, [FailedToTrain(context_free_loss=floor)], vectorised=vectorised) == []

    # a short run still on its way down, above the floor: cut off by its budget, not stuck
    falling = [{"step": s, "loss": 5.5 - 0.05 * s} for s in range(1, 41)]
    assert replay(falling, [FailedToTrain(context_free_loss=floor)], finished=True,
                  vectorised=vectorised) == []
    # a run that settled more than 10 % below the floor learned from its input
    learned = [{"step": s, "loss": 2.9 + 2.0 * math.exp(-s / 5)} for s in range(1, 200)]
    assert replay(learned, [FailedToTrain(context_free_loss=floor)], finished=True,
                  vectorised=vectorised) == []


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_loss_still_falling_too_slowly_to_leave_token_statistics_failed_to_train(vectorised):
    """Without a reference: 250 steps ending at 0.93 of the context-free loss and falling
    2.5 % per 20 records would need three more windows to get 10 % below it. A run falling
    fast enough to get there in one more is cut off by its budget instead."""
    floor = 3.45
    slow = [{"step": s, "loss": 3.2 * (1 - 0.025) ** ((s - 250) / 20) + 2.0 * math.exp(-s / 5)}
            for s in range(1, 251)]
    (event,) = replay(slow, [FailedToTrain(context_free_loss=floor)], finished=True,
                      vectorised=vectorised)
    assert event.severity == "critical"
    assert "still falling at 3.2" in event.message and "(3% over its last 20 records" in event.message
    assert event.evidence["progress"] == pytest.approx(0.025, abs=1e-3)
    fast = [{"step": s, "loss": 3.2 * (1 - 0.12) ** ((s - 250) / 20)} for s in range(1, 251)]
    assert replay(fast, [FailedToTrain(context_free_loss=floor)], finished=True,
                  vectorised=vectorised) == []

@pytest.mark.parametrize("vectorised", [False, True])
def test_batch_noise_does_not_pass_a_stalled_loss_as_learning(vectorised):
    """A loss stuck at 3.2, above the context-free 3.19, with 2 % noise per batch. By
    chance its last 5 losses' median sits 2.5 % under that of the 5 twenty records before;
    the trend of its last 25 losses is flat, and the run failed to train."""
    rng = np.random.default_rng(69)
    stuck = [{"step": s, "loss": (3.2 + 2.0 * math.exp(-s / 5)) * math.exp(0.02 * rng.standard_normal())}
             for s in range(1, 201)]
    (event,) = replay(stuck, [FailedToTrain(context_free_loss=3.19)], finished=True,
                      vectorised=vectorised)
    assert event.severity == "critical" and "stalled at 3.177, within 1% of 3.19" in event.message

    # one odd batch at the end of a run still falling leaves it falling
    falling = [{"step": s, "loss": 5.5 - 0.05 * s} for s in range(1, 41)]
    falling[-1]["loss"] = 3 * falling[-2]["loss"]
    assert replay(falling, [FailedToTrain(context_free_loss=3.26)], finished=True,
                  vectorised=vectorised) == []


def test_context_free_loss_reaches_failed_to_train_and_is_checked():
    detectors = {d.name: d for d in default_detectors(context_free_loss=3.26)}
    assert detectors["failed_to_train"].config.context_free_loss == 3.26
    with pytest.raises(ValueError, match="context_free_loss must be a positive number"):
        default_detectors(context_free_loss=0.0)
    with pytest.raises(ValueError, match="context_free_margin must be in"):
        FailedToTrain(context_free_margin=1.0)
    with pytest.raises(ValueError, match="not both"):
        loopdiag.Monitor(detectors=[FailedToTrain()], context_free_loss=3.26)


def test_no_run_is_judged_by_a_context_free_line_its_reference_did_not_pass():
    """On data with little to learn past token frequencies (a DNA-like text: 4 % below
    them) the one-loop reference stalls near the context-free loss too; a looped run that
    ends beside it is not behind anything, so only its gap to the reference judges it."""
    floor = 1.385
    beside = [{"step": s, "loss": 1.382 + 2.0 * math.exp(-s / 5)} for s in range(1, 200)]

    def judged(expected_loss):
        detectors = default_detectors(expected_loss, context_free_loss=floor)
        return verdict(beside, replay(beside, detectors, finished=True), finished=True)

    assert judged(None)["status"] == "failed_to_train"  # no reference: the line judges
    assert judged(1.0)["status"] == "failed_to_train"  # a reference past the line
    assert judged(1.380)["status"] == "stable"  # the reference stalled there too
    # 1.25 stalled short of the line (0.9 × 1.385 = 1.2465) too, and the run is 11 % behind it
    assert judged(1.25)["status"] == "failed_to_train"
    # a stream growing 1.4× per 100 records while the loss improves 0.4 %: a healthy slow
    # learner on such data, and what a stuck model on text shows (there 25 % behind)
    slow = [{"step": s, "loss": 1.389 - 0.00004 * s, "resid_norm": [20.0 * 1.0034 ** s]}
            for s in range(1, 301)]
    for expected, judges in ((None, True), (1.25, False), (1.24, True)):
        (plateau,) = [d for d in default_detectors(expected, context_free_loss=floor)
                      if d.name == "collapse_plateau"]
        for vectorised in (False, True):
            stalls = replay(slow, [plateau], vectorised=vectorised)
            assert bool(stalls) == judges
            assert all(event.message.startswith("The best smoothed loss") for event in stalls)

    monitor = loopdiag.Monitor(expected_loss=1.380, context_free_loss=floor)
    (note,) = monitor.update(beside[0])
    assert (note.detector, note.severity, note.step) == ("monitor", "info", 1)
    assert "The reference ended at 1.38, not 10% below 1.385" in note.message
    assert monitor.update(beside[1]) == []  # said once
    assert loopdiag.Monitor(expected_loss=1.0, context_free_loss=floor).update(beside[0]) == []


def test_a_reference_that_never_learned_token_frequencies_leaves_the_line_in_force():
    """A learning rate too low for the budget (the main job at 1e-4): every run, the one-loop
    reference included, stalled at 1.13× the context-free loss. A model that trains learns
    the token frequencies first; a reference stalled above them did not, so a run beside it
    is judged by the line, as the reference is, not called stable for matching it. Stalled
    at the frequencies themselves (1 % above), the reference still voids the line."""
    floor = 3.263

    def judged(level, expected_loss):
        beside = [{"step": s, "loss": level + 2.0 * math.exp(-s / 5)} for s in range(1, 300)]
        detectors = default_detectors(expected_loss, context_free_loss=floor)
        return verdict(beside, replay(beside, detectors, finished=True), finished=True)["status"]

    assert judged(3.685, None) == "failed_to_train"  # the reference's own verdict
    assert judged(3.685, 3.69) == "failed_to_train"
    assert judged(1.01 * floor, 1.01 * floor) == "stable"
    start = {"step": 1, "loss": 5.0}
    assert loopdiag.Monitor(expected_loss=3.69, context_free_loss=floor).update(start) == []
    (note,) = loopdiag.Monitor(expected_loss=1.01 * floor, context_free_loss=floor).update(start)
    assert note.detector == "monitor"
    # the same model got past the line at another learning rate: the data holds more
    beside = [{"step": s, "loss": 1.01 * floor + 2.0 * math.exp(-s / 5)} for s in range(1, 300)]
    detectors = default_detectors(1.01 * floor, context_free_loss=floor, best_known_loss=0.4 * floor)
    assert verdict(beside, replay(beside, detectors, finished=True), finished=True)["status"] == "failed_to_train"
    assert loopdiag.Monitor(expected_loss=1.01 * floor, context_free_loss=floor,
                            best_known_loss=0.4 * floor).update(start) == []
    with pytest.raises(ValueError, match="best_known_loss must be a positive number"):
        default_detectors(3.69, context_free_loss=floor, best_known_loss=-1.0)


@pytest.mark.parametrize("vectorised", [False, True])
def test_identical_positions_are_no_collapse_where_the_reference_learned_only_token_frequencies(
        vectorised):
    """On text with nothing to learn past its token frequencies (uniformly random
    characters) the best a model can do is predict them, which identical positions do: the
    one-loop reference ended at the context-free loss, and the looped runs beside it with
    every position identical are no worse. Where the reference learned past that line, the
    same records are the looped collapse."""
    floor = 3.26
    records = looped_run(collapse=True)
    for record in records:  # the stream doubling every loop: an explosion, were it a collapse
        record["resid_norm"] = [8.0 * 2.5 ** k for k in range(LOOPS)]

    def judged(expected_loss, reference_losses=None):
        detectors = default_detectors(expected_loss, context_free_loss=floor,
                                      reference_losses=reference_losses)
        events = replay(records, detectors, finished=True, vectorised=vectorised)
        return verdict(records, events, finished=True), events

    collapsed, events = judged(2.4)
    assert (collapsed["status"], collapsed["mechanism"]) == ("collapsed", "representation")
    assert any(event.detector == "residual_explosion" and event.severity == "critical"
               and "all positions carry the same vector" in event.message for event in events)

    beside, events = judged(3.27)  # the reference ended within 10 % of the floor
    assert beside["status"] == "stable"
    severities = {event.detector: event.severity for event in events
                  if event.detector in ("representation_collapse", "residual_explosion")}
    assert severities == {"representation_collapse": "warn", "residual_explosion": "info"}
    # ... by its end: a reference curve sitting at the line says so, one still falling
    # 1 % a record says its budget cut it off there, and the data holds more
    flat = [(step, 3.27) for step in range(1, 151)]
    falling = [(step, 3.27 * 1.01 ** (150 - step)) for step in range(1, 151)]
    assert judged(3.27, flat)[0]["status"] == "stable"
    cut_off, _ = judged(3.27, falling)
    assert (cut_off["status"], cut_off["mechanism"]) == ("collapsed", "representation")
    assert loopdiag.Monitor(expected_loss=3.27, context_free_loss=floor,
                            reference_losses=falling).update(records[0]) == []
    (note,) = loopdiag.Monitor(expected_loss=3.27, context_free_loss=floor,
                               reference_losses=flat).update(records[0])
    assert "no run is judged by that line or by identical positions" in note.message
    alone = RepresentationCollapse(expected_loss=3.27, context_free_loss=floor)
    (warn,) = replay(records, [alone], vectorised=vectorised)
    assert (warn.severity, warn.step) == ("warn", 7)
    with pytest.raises(ValueError, match="expected_loss must be a positive number"):
        ResidualExplosion(expected_loss=-1.0)
    with pytest.raises(ValueError, match="reference_learning must be true or false"):
        RepresentationCollapse(reference_learning="yes")


@pytest.fixture(scope="module")
def markov():
    yield from loaded("markov_bases.py", "markov_bases")


def test_the_dna_like_text_holds_a_few_per_cent_past_its_token_frequencies(markov):
    text, unigram, conditional = markov.markov_bases(5000, 6.0, seed=7)
    assert len(text) == 5000 and set(text) == set("ACGT")
    assert 0.9 * unigram < conditional < unigram <= math.log(4)  # inside the 10 % line
    assert markov.markov_bases(5000, 6.0, seed=7)[0] == text  # seeded
    _, unigram_peaked, conditional_peaked = markov.markov_bases(5000, 0.5, seed=7)
    assert conditional_peaked < 0.9 * unigram_peaked  # peaked transitions: more to learn


def test_foundry_high_loss_anchor_follows_its_source():
    events = replay(worse_than_at_start(), [FoundryHighLoss()])
    assert events and events[0].step == 201 and events[0].severity == "warn"
    spike = [{"step": s, "loss": 2.0 if s < 150 or s > 160 else 9.0} for s in range(1, 200)]
    spikes = replay(spike, [FoundryHighLoss()])
    assert [event.step for event in spikes] == list(range(154, 161))  # the 5th outlier on


def test_verdict_names_the_mechanism():
    records = looped_run(collapse=True)
    events = replay(records, default_detectors(), finished=True)
    judged = verdict(records, events, finished=True)
    assert judged["status"] == "collapsed" and judged["mechanism"] == "representation"
    assert judged["first_warning_step"] <= 15  # within the first 10 % of 150 steps
    assert "all positions identical" in judged["message"]
    assert judged["final_smoothed_loss"] == pytest.approx(3.3, rel=0.05)


def test_verdict_failed_to_train_and_divergence_precedence():
    stuck = [{"step": s, "loss": 3.2 + 2.0 * math.exp(-s / 5)} for s in range(1, 200)]
    events = replay(stuck, default_detectors(expected_loss=2.4), finished=True)
    judged = verdict(stuck, events, finished=True)
    assert (judged["status"], judged["signal"], judged["mechanism"]) == (
        "failed_to_train", "failed_to_train", None)
    diverged = [*stuck, {"step": 200, "loss": math.nan}]
    assert verdict(diverged, events, finished=True)["status"] == "diverged"


def test_expected_loss_reaches_failed_to_train_unless_the_suite_sets_it():
    assert {d.name: d for d in default_detectors(2.4)}["failed_to_train"].config.expected_loss == 2.4
    detectors = {d.name: d for d in default_detectors(2.4, failed_to_train={"expected_loss": 2.0})}
    assert detectors["failed_to_train"].config.expected_loss == 2.0  # its override wins
    with pytest.raises(ValueError, match="expected_loss must be a positive number"):
        default_detectors(failed_to_train={"expected_loss": -1.0})
    with pytest.raises(ValueError, match="expected_loss must be a positive number"):
        default_detectors(expected_loss=math.nan)


def test_a_model_without_loop_statistics_is_told_what_is_not_judged():
    lines = []
    monitor = loopdiag.Monitor(sinks=[loopdiag.CallbackSink(lines.append)])
    for step in range(1, 30):  # a user's model that records only its loss and grad norm
        monitor.update({"step": step, "loss": 3.0, "grad_norm": 1.0})
    (note,) = lines
    assert (note.detector, note.severity, note.step) == ("monitor", "info", 10)
    assert "token_corr" in note.message and "representation_collapse" in note.message
    assert "failed_to_train" not in monitor.not_judged()  # it reads the loss
    # without `update_ratio` neither an oversized step nor, without a reference, the
    # failure it implies can be judged: the note says so
    assert "update_ratio" in note.message and "update_size" in note.message
    judged = verdict([{"step": s, "loss": 3.0} for s in range(1, 30)], monitor.events, finished=True)
    assert judged["status"] == "stable"
