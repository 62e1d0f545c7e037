"""`behind_reference`: a run whose loss stalled at token statistics while its reference, at
the same step, had learned past them."""

from __future__ import annotations

import math

import pytest

from loopdiag.detect import BehindReference, default_detectors, replay
from loopdiag.detect.monitor import Monitor

pytestmark = pytest.mark.torchless

CONTEXT_FREE = 3.3
STEPS = 150


def wobble(step: int) -> float:
    return 1 + 0.02 * math.sin(1.7 * step)


def curve(level, steps: int = STEPS) -> list[tuple[int, float]]:
    return [(step, level(step) * wobble(step)) for step in range(1, steps + 1)]


def learning(step: int, late: int = 0) -> float:
    """From 5.5 down to the context-free plateau, leaving it from step 20 + `late`."""
    plateau = CONTEXT_FREE + 2.2 * math.exp(-step / 4)
    past = max(0, step - 20 - late)
    return plateau - 1.3 * (1 - math.exp(-past / 25))


def stuck(step: int) -> float:
    return CONTEXT_FREE + 2.2 * math.exp(-step / 4)


REFERENCE = curve(learning)


def records(level, steps: int = STEPS) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in curve(level, steps)]


def events_of(level, **given) -> list:
    given = {"context_free_loss": CONTEXT_FREE, "reference_losses": REFERENCE, **given}
    run = records(level)
    events = replay(run, default_detectors(**given))
    assert [e.to_dict() for e in events] == [
        e.to_dict() for e in replay(run, default_detectors(**given), vectorised=False)]
    return [event for event in events if event.detector == "behind_reference"]


def test_a_run_stuck_at_token_statistics_is_warned_once_it_took_twice_its_reference_s_time():
    (event,) = events_of(stuck)
    assert event.severity == "warn"
    # the reference got 10 % below the context-free loss around step 38: the run is held to
    # that from twice as many steps on
    evidence = event.evidence
    assert 30 <= evidence["reference_left_at"] <= 45
    assert event.step == 2 * evidence["reference_left_at"]
    assert f"learned past token statistics by step {evidence['reference_left_at']}" in event.message
    assert evidence["smoothed_loss"] >= 0.9 * CONTEXT_FREE
    assert evidence["reference_loss"] <= 0.9 * CONTEXT_FREE
    assert evidence["reference_step"] == event.step
    assert f"{evidence['reference_loss']:.4g} by step {event.step}" in event.message
    assert "what the data's token frequencies alone give" in event.message


def test_a_loss_creeping_up_on_the_plateau_is_said_to_be_higher():
    (event,) = events_of(lambda step: stuck(step) * (1 + 0.0005 * step))
    assert event.evidence["progress"] < 0
    assert f"{-100 * event.evidence['progress']:.1f}% higher than 20 records ago" in event.message


def test_healthy_runs_are_not_warned():
    # the reference itself, and runs that leave the plateau later, before twice its time
    assert events_of(learning) == []
    for late in (12, 30):
        assert events_of(lambda step: learning(step, late=late)) == []
    # trained past token statistics, stalled 15 % behind its reference (a constant learning
    # rate's plateau before the decay): not the collapse this detector reads
    assert events_of(lambda step: max(learning(step), 0.88 * CONTEXT_FREE)) == []


def test_nothing_is_judged_without_a_reference_curve_or_a_context_free_loss():
    assert events_of(stuck, reference_losses=None) == []
    assert events_of(stuck, context_free_loss=None) == []
    monitor = Monitor(context_free_loss=CONTEXT_FREE)
    for record in records(stuck):
        monitor.update(record)
    # a run without a reference is not reported as missing a statistic
    assert "behind_reference" not in monitor.not_judged()


def test_a_reference_logged_less_often_is_read_at_its_latest_step_up_to_the_run_s():
    sparse = REFERENCE[::2]
    (event,) = events_of(stuck, reference_losses=sparse)
    assert event.evidence["reference_step"] <= event.step
    assert event.step - event.evidence["reference_step"] < 2


@pytest.mark.parametrize("losses, match", [
    ("3.0", "sequence of"),
    ([], "empty"),
    ([(1, 3.0), (1, 2.9)], "steps must increase"),
    ([(2, 3.0), (1, 2.9)], "steps must increase"),
    ([(1, math.nan)], "finite loss"),
    ([(1.5, 3.0)], "finite loss"),
    ([(1, "3.0")], "finite loss"),
    ([(1, 3.0, 2)], "finite loss"),
])
def test_a_malformed_reference_curve_is_refused_naming_the_detector(losses, match):
    with pytest.raises(ValueError, match=f"behind_reference: .*{match}"):
        default_detectors(context_free_loss=CONTEXT_FREE, reference_losses=losses)
    with pytest.raises(ValueError, match=match):
        BehindReference(reference_losses=losses)


def test_a_curve_from_a_suite_file_is_taken_as_pairs():
    detector = BehindReference(reference_losses=[[1, 3.0], [2, 2.5]],
                               context_free_loss=CONTEXT_FREE)
    assert detector.config.reference_losses == ((1, 3.0), (2, 2.5))
    assert "reference_losses" not in repr(detector)  # a curve of thousands of points


def test_a_reference_s_curve_is_read_from_its_records(tmp_path):
    """Finite losses at integer steps, in step order; records without a loss (a validation
    loss between logged steps) are not part of it."""
    from loopdiag.store import RunWriter
    from loopdiag.store.reference import recorded_losses

    with RunWriter(tmp_path / "ref", {"cell": {}, "train": {"steps": 5}}) as run:
        for record in ({"step": 1, "loss": 5.0}, {"step": 2, "loss": math.nan},
                       {"step": 3, "loss": 3.9},
                       {"step": 4, "val_loss": 3.7}, {"step": 5, "loss": 3.5}):
            run.log(record)
        run.close({"status": "stable"})
    assert recorded_losses(tmp_path / "ref") == ((1, 5.0), (3, 3.9), (5, 3.5))
    BehindReference(reference_losses=recorded_losses(tmp_path / "ref"))  # a valid curve
    with RunWriter(tmp_path / "lossless", {"cell": {}, "train": {"steps": 1}}) as run:
        run.log({"step": 1, "grad_norm": 1.0})
        run.close({"status": "stable"})
    assert recorded_losses(tmp_path / "lossless") is None  # no curve, not an empty one


def test_a_patience_under_one_is_refused():
    with pytest.raises(ValueError, match="behind_reference: patience must be >= 1, got 0.5"):
        default_detectors(behind_reference={"patience": 0.5})
