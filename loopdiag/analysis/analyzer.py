"""One run, judged from its store alone: verdict, headline numbers and a plain explanation.

Definitions (they are the columns of `suite_table` too):
- final loss: mean train loss over the last 10% of logged steps (at least one); NaN when
  any of those is non-finite, so a diverged run never gets a flattering number. A record
  holding only a validation loss (taken at a step the probes did not log) counts neither
  as a logged step nor as a non-finite loss (`training_rows`).
- best loss: smallest finite logged train loss.
- residual growth over steps: last-loop `resid_norm` at the last step where it is finite,
  over its value at the first logged step after the learning-rate warm-up.
- residual ratio across loops: `resid_norm[K] / resid_norm[1]` at that same last step.
- oscillation index: mean of max(0, -grad_cos) over the second half of the logged steps;
  0 when consecutive gradients never point against each other, 1 when every step
  reverses the last one exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loopdiag.analysis.rejudge import judge
from loopdiag.detect import default_detectors
from loopdiag.detect.base import not_judged_message
from loopdiag.detect.failure import FailedToTrainConfig
from loopdiag.detect.symptoms import EMA_SPAN, behind_from, few_records_message
from loopdiag.detect.verdict import FAILED_STATUSES, smoothed_ends, trained_out
from loopdiag.store import RunData
from loopdiag.store import event_frame, is_run_dir, read_records
from loopdiag.store.reference import context_free_loss, recorded_losses

LOSS_COLUMNS = ("loss", "train_loss")  # the recorder's name first, the trainer's second
FINAL_FRACTION = 0.1
CELL_KEYS = ("arch", "n_loops", "seed", "lr")
EXPLAINED = (*FAILED_STATUSES, "recovered")  # runs a report explains: failures, and collapses trained out of


def collapsed_before_interrupt(judged: dict[str, Any]) -> bool:
    """Whether an interrupted run's verdict holds a collapse found before it stopped (a
    run stopped by hand after a critical alert): it stays `interrupted`, as `--resume`
    finishes such runs and only their end can tell a recovery, but keeps that collapse."""
    return judged.get("status") == "interrupted" and judged.get("signal") is not None
WARNING_SEVERITIES = ("warn", "critical")


def training_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """`steps` without the records that hold only validation values (those
    `judged_in_training` turns down, read from a frame): the store keeps a validation loss
    taken at a step the probes did not log as a record of its own, and in a frame its
    missing train loss reads as NaN, like a loss that turned non-finite. The trainer
    evaluates no step after a non-finite loss, so a record with both is not one of those."""
    loss = next((column for column in LOSS_COLUMNS if column in steps.columns), None)
    validation = [column for column in steps.columns if column.startswith("val_")]
    if loss is None or not validation:
        return steps
    validation_only = steps[loss].isna() & steps[validation].notna().any(axis=1)
    return steps[~validation_only] if validation_only.any() else steps


def loss_series(steps: pd.DataFrame) -> pd.Series:
    """Train loss indexed by step (empty when the run logged none)."""
    steps = training_rows(steps)
    for column in LOSS_COLUMNS:
        if column in steps.columns:
            return steps.set_index("step")[column].astype(float)
    return pd.Series(dtype=float)


def _values(steps: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """The first of `columns` that `steps` has, as float64 (None read as NaN); empty when
    it has none. Plain arrays: a sweep's table asks this of every run."""
    column = next((name for name in columns if name in steps.columns), None)
    return np.empty(0) if column is None else steps[column].to_numpy(dtype=float, na_value=np.nan)


def final_loss(steps: pd.DataFrame) -> float:
    losses = _values(training_rows(steps), LOSS_COLUMNS)
    if not len(losses):
        return math.nan
    tail = losses[-max(1, int(len(losses) * FINAL_FRACTION)):]
    return float(tail.mean()) if np.isfinite(tail).all() else math.nan


def loss_records(steps: pd.DataFrame) -> int:
    """How many training losses the run recorded: what its verdict was read from."""
    return len(_values(training_rows(steps), LOSS_COLUMNS))


def best_loss(steps: pd.DataFrame) -> float:
    losses = _values(steps, LOSS_COLUMNS)
    finite = losses[np.isfinite(losses)]
    return float(finite.min()) if len(finite) else math.nan


def final_val_loss(steps: pd.DataFrame) -> float:
    evaluated = _values(steps, ("val_loss",))
    evaluated = evaluated[~np.isnan(evaluated)]
    return float(evaluated[-1]) if len(evaluated) else math.nan


def oscillation_index(steps: pd.DataFrame) -> float:
    cosines = _values(training_rows(steps), ("grad_cos",))
    second_half = cosines[len(cosines) // 2:]
    second_half = second_half[~np.isnan(second_half)]
    return float(np.maximum(0.0, -second_half).mean()) if len(second_half) else math.nan


def residual_endpoints(run: RunData) -> tuple[pd.DataFrame, int, int] | None:
    """(`resid_norm` as a (step × loop) table, steps where every loop is finite only; its
    first step after the warm-up (else its first step); its last step); None when the run
    recorded no finite residual norms."""
    table = run.loop_table("resid_norm")
    table = table[np.isfinite(table.to_numpy()).all(axis=1)]
    if table.empty:
        return None
    steps = table.index.to_numpy()
    after_warmup = steps[steps > warmup_steps(run.config)]
    start = after_warmup[0] if len(after_warmup) else steps[0]
    return table, int(start), int(steps[-1])


def residual_growth(run: RunData) -> tuple[float, float]:
    """(growth over steps of the last loop's norm, last loop / first loop at the end)."""
    endpoints = residual_endpoints(run)
    if endpoints is None:
        return math.nan, math.nan
    table, start, _ = endpoints
    norms = table.to_numpy()
    first = np.searchsorted(table.index.to_numpy(), start)
    return float(norms[-1, -1] / norms[first, -1]), float(norms[-1, -1] / norms[-1, 0])


def warmup_steps(config: dict[str, Any]) -> int:
    train = config.get("train")
    return int((train if isinstance(train, dict) else config).get("warmup_steps") or 0)


def run_cell(run: RunData) -> dict[str, Any]:
    """arch, n_loops, seed, lr of a run: its config's `cell`, the training lr otherwise."""
    cell = run.config.get("cell") if isinstance(run.config.get("cell"), dict) else {}
    train = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}
    found = {key: cell.get(key) for key in CELL_KEYS}
    if found["lr"] is None:
        found["lr"] = train.get("lr", run.config.get("lr"))
    return found


def run_verdict(run: RunData) -> dict[str, Any]:
    """The stored summary when there is one; else `replayed_verdict` against the run
    config's reference."""
    if run.summary is not None and run.summary.get("status"):
        return {**run.summary, "recomputed": False}
    return replayed_verdict(run)


def replayed_verdict(run: RunData, reference: dict[str, Any] | None = None,
                     reference_dir: Path | None = None) -> dict[str, Any]:
    """The default detectors (with the threshold overrides of the run config's `detectors`
    mapping, as the run used them) replayed over the store, judged against `reference`
    (`{"expected_loss": ..., "run": ...}`; None: the run config's) and the loss curve of the
    run in `reference_dir` (for the run config's reference: its run in the same suite folder,
    where it is), marked `recomputed: True` and carrying the replayed `events`. Nothing
    stored changes. A run whose summary
    says it was interrupted, or that logged fewer steps than its config planned and left no
    summary, is judged unfinished: it can read as interrupted."""
    records = read_records(run.run_dir)
    overrides = run.config.get("detectors")
    if run.summary is not None and run.summary.get("status"):
        finished = run.summary["status"] != "interrupted"
    else:
        train = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}
        planned = train.get("steps")
        finished = planned is None or (records[-1]["step"] if records else 0) >= planned
    if reference is None:
        reference = run.config.get("reference") if isinstance(run.config.get("reference"), dict) else {}
        if isinstance(reference.get("run"), str):
            reference_dir = run.run_dir.parent / reference["run"]
    losses = recorded_losses(reference_dir) if reference_dir is not None and is_run_dir(reference_dir) else None
    events, judged = judge(records, overrides if isinstance(overrides, dict) else {}, reference.get("expected_loss"),
                           finished=finished, context_free_loss=context_free_loss(run.config),
                           reference_losses=losses, best_known_loss=reference.get("best_known_loss"))
    return {**judged, "recomputed": True, "reference": reference or None,
            "events": [event.to_dict() for event in events]}


def judged_against(run: RunData, judged: dict[str, Any]) -> dict[str, Any] | None:
    """The reference (`expected_loss`, and the `run` it came from when known) a verdict was
    judged against, or None: the verdict's own record of it, else (a summary written before
    verdicts kept one) the run config's."""
    reference = judged["reference"] if "reference" in judged else run.config.get("reference")
    return reference if isinstance(reference, dict) and reference.get("expected_loss") is not None else None


def reference_text(run: RunData, judged: dict[str, Any]) -> str:
    """What a verdict that found no failure to train was judged against, in one or two
    sentences: without a reference, a run that trained but ended behind reads as stable."""
    reference = judged_against(run, judged)
    if reference is None:
        # A suite judges a one-loop run against its architecture's one-loop runs at lower
        # learning rates (`reference_run`).
        how = ("train its architecture with one loop at a lower learning rate in the same suite"
               if run_cell(run)["n_loops"] == 1 else
               "train the one-loop model of the same architecture in the same suite")
        return ("Judged without an expected loss, so a run that trained but ended 10 % or more "
                f"above what its model should reach reads as stable. To judge that, {how}, or "
                "give the loss it should reach (`Monitor(expected_loss=...)`); for this run, now: "
                f"`loopdiag analyze {run.run_dir} --expected-loss LOSS` or `--reference RUN`.")
    expected, final = float(reference["expected_loss"]), judged.get("final_smoothed_loss")
    source = f" (the final smoothed loss of run {reference['run']})" if reference.get("run") else ""
    ended = ("" if not isinstance(final, (int, float)) or not math.isfinite(final) or expected <= 0
             else f"; its smoothed loss ended at {_fmt(final)}, {100 * (final / expected - 1):+.1f} %")
    shown = _fmt(expected)
    # a whole number keeps its ".0": "of 2." at a sentence's end reads as a number cut off
    shown = f"{shown}.0" if shown.isdigit() else shown
    text = f"Judged against an expected loss of {shown}{source}{ended}."
    floor = context_free_loss(run.config)
    overrides = run.config.get("detectors")
    thresholds = overrides.get("failed_to_train") if isinstance(overrides, dict) else None
    config = FailedToTrainConfig(**{key: value for key, value in (thresholds or {}).items()
                                    if key in ("gap", "context_free_margin")})
    if floor is not None and expected < config.context_free_margin * floor:
        behind = behind_from(expected, floor, config.gap, config.context_free_margin)
        text += (f" That is under {100 * config.context_free_margin:.0f} % of the data's context-free "
                 f"loss ({_fmt(floor)}): the reference learned nearly all the data holds, and a run "
                 f"is behind it from {_fmt(behind)} on.")
    best = reference.get("best_known_loss")
    # A suite's reference is its gentlest rate's one-loop run (`store.reference`); where a
    # faster rate took the same model past the gap, that bar is a slow one.
    if isinstance(best, (int, float)) and 0 < best and expected >= behind_from(best, floor, config.gap,
                                                                                config.context_free_margin):
        where = f" (run {reference['best_known_run']})" if reference.get("best_known_run") else ""
        text += (f" The same model got to {_fmt(best)} with one loop at another learning rate{where}, "
                 f"{100 * (1 - best / expected):.0f} % lower: a stable verdict against this reference "
                 "says the run trained as well as it, not that it learned what its model can in these steps.")
    return text


def not_judged_text(judged: dict[str, Any]) -> str:
    """The detectors a verdict could not use, in the monitor's sentence ("" when every one
    judged)."""
    blind = judged.get("not_judged") or []
    if not blind:
        return ""
    reads = {detector.name: detector.reads for detector in default_detectors()}
    # in the detectors' order, as the monitor's line has them
    return not_judged_message({name: keys for name, keys in reads.items() if name in blind},
                              all_blind=set(blind) >= set(reads))


def few_records_text(run: RunData, judged: dict[str, Any]) -> str:
    """The monitor's line for a stable run of fewer losses than the loss is smoothed over
    ("" otherwise): a rejudged store has lost its live events."""
    if judged.get("status") != "stable":
        return ""
    records = loss_records(run.steps_of((*LOSS_COLUMNS, "val_loss")))
    return few_records_message(records) if 0 < records < EMA_SPAN else ""


def verdict_events(run: RunData, judged: dict[str, Any]) -> pd.DataFrame:
    """The events behind a verdict, in step order: the replayed ones for a recomputed
    verdict, else the run's stored events."""
    events = event_frame(judged["events"]) if judged.get("recomputed") else run.events
    return events.sort_values("step", kind="stable")


def first_warning_step(run: RunData, judged: dict[str, Any]) -> float:
    step = judged.get("first_warning_step")
    if step is None:
        events = verdict_events(run, judged)
        warnings = events.loc[events["severity"].isin(WARNING_SEVERITIES), "step"]
        step = warnings.min() if len(warnings) else None
    return math.nan if step is None else float(step)


def explain(run: RunData, judged: dict[str, Any] | None = None) -> str:
    """A few plain sentences: what failed, when, which signal fired first, and what the
    residual norm, gradient oscillation and loss did, with the numbers."""
    judged = judged or run_verdict(run)
    # all it reads, not every column (val_loss tells a record of its own from a logged step)
    steps = run.steps_of((*LOSS_COLUMNS, "val_loss", "grad_cos"))
    cell = run_cell(run)
    # A run made with the Python API, outside a suite, may have none of these.
    forms = {"arch": "{}", "n_loops": "K={}", "seed": "seed {}", "lr": "lr {:g}"}
    known = [form.format(cell[key]) for key, form in forms.items() if cell[key] is not None]
    who = f"{run.run_id} ({', '.join(known)})" if known else run.run_id
    status = judged.get("status")
    if status == "interrupted":
        return _interrupted_story(who, judged, steps)
    if status == "recovered":
        return " ".join(sentence for sentence in (
            f"{who} collapsed ({judged.get('mechanism')}) at step {judged.get('step')} "
            f"(signal: {judged.get('signal') or 'unnamed'}) and recovered: it trained on to a "
            f"final train loss of {_fmt(final_loss(steps))} (best {_fmt(best_loss(steps))}), "
            f"below what the data's token frequencies alone give.",
            _verdict_message(judged), _first_signal(run, judged), _residual_story(run)) if sentence)
    if status not in FAILED_STATUSES:
        last = int(steps["step"].iloc[-1]) if len(steps) else None
        return (f"{who} ended {status} at step {last}; final train loss "
                f"{_fmt(final_loss(steps))}, best {_fmt(best_loss(steps))}.")
    mechanism = f" ({judged['mechanism']})" if judged.get("mechanism") else ""
    what = status.replace("_", " ")
    sentences = [f"{who} {what}{mechanism} at step {judged.get('step')} "
                 f"(signal: {judged.get('signal') or 'unnamed'}).",
                 _verdict_message(judged),
                 _expected_source(run, judged) if status == "failed_to_train" else "",
                 _first_signal(run, judged), _residual_story(run)]
    if status == "collapsed":
        sentences.append(_recovery_not_credited(run, judged, steps))
    oscillation = oscillation_index(steps)
    if not math.isnan(oscillation):
        sentences.append(f"Gradient oscillation index (mean of max(0, -cos) between consecutive "
                         f"gradients, second half of training): {_fmt(oscillation)}.")
    losses = loss_series(steps)
    finite = losses[np.isfinite(losses)]
    if status == "diverged" and len(finite):
        sentences.append(f"The last finite train loss was {_fmt(finite.iloc[-1])} at step "
                         f"{int(finite.index[-1])}; the best was {_fmt(finite.min())}.")
    elif len(finite):
        sentences.append(f"Train loss ended at {_fmt(final_loss(steps))} against a best of "
                         f"{_fmt(finite.min())}.")
    return " ".join(sentence for sentence in sentences if sentence)


def _interrupted_story(who: str, judged: dict[str, Any], steps: pd.DataFrame) -> str:
    last = int(steps["step"].iloc[-1]) if len(steps) else None
    ended = (f"{who} was interrupted at step {last}, with a final train loss of "
             f"{_fmt(final_loss(steps))} (best {_fmt(best_loss(steps))}).")
    if not collapsed_before_interrupt(judged):
        return f"{ended} Resume it to judge its end."
    return " ".join(sentence for sentence in (
        ended, f"Before that, it collapsed ({judged.get('mechanism')}) at step {judged.get('step')} "
        f"(signal: {judged.get('signal')}).", _verdict_message(judged),
        "Resume it to judge its end: a run can still train out of a collapse.") if sentence)


def _recovery_not_credited(run: RunData, judged: dict[str, Any], steps: pd.DataFrame) -> str:
    """Why a collapsed run that trained out of its collapse is not `recovered`: it ended
    behind what it was judged against (a critical `failed_to_train`)."""
    floor = context_free_loss(run.config)
    final, best = smoothed_ends(loss_series(steps).to_numpy())
    if not trained_out(final, best, floor):
        return ""
    events = verdict_events(run, judged)
    behind = events[(events["detector"] == "failed_to_train") & (events["severity"] == "critical")]
    if not len(behind):
        return ""
    return " ".join(sentence for sentence in (
        f"It trained out of the collapse, to a smoothed loss of {_fmt(final)}, below the "
        f"{_fmt(floor)} the data's token frequencies alone give, but is not judged recovered: "
        f"{behind.iloc[0]['message']}", _expected_source(run, judged)) if sentence)


def _expected_source(run: RunData, judged: dict[str, Any]) -> str:
    """Where the loss a run was judged to fall short of comes from, for a reader who meets
    "the 2.22 this model should reach" in a `failed_to_train` message."""
    reference = judged_against(run, judged)
    if reference is None:
        return ""
    expected = f"{float(reference['expected_loss']):.4g}"  # as `failed_to_train`'s message gives it
    if isinstance(reference.get("run"), str):
        return f"The {expected} is the final smoothed loss of {reference['run']}, the run it was judged against."
    return f"The {expected} is the expected loss it was given."


def _verdict_message(judged: dict[str, Any]) -> str:
    """What the deciding event said, for verdicts stored with it."""
    message = judged.get("message")
    return f"What broke: {message}" if isinstance(message, str) and message else ""


def _first_signal(run: RunData, judged: dict[str, Any]) -> str:
    """The first warning (warn or critical, as `first_warning_step` counts them), and an
    event of information only when one came before it: named as information, not as a
    warning of what followed."""
    events = verdict_events(run, judged)
    warnings = events[events["severity"].isin(WARNING_SEVERITIES)]
    sentences = []
    if len(events) and events.iloc[0]["severity"] not in WARNING_SEVERITIES:
        info = events.iloc[0]
        sentences.append(f"Information first: {info['detector']} at step {int(info['step'])}"
                         f"{_quoted(info['message'])}.")
    if len(warnings):
        first = warnings.iloc[0]
        lead = None if judged.get("step") is None else int(judged["step"]) - int(first["step"])
        if lead == 0:
            repeated = first["message"] == judged.get("message")  # already quoted as what broke
            sentences.append("No detector warned before that step"
                             + ("." if repeated else f"; then {first['detector']} did"
                                f"{_quoted(first['message'])}."))
        else:
            notice = "" if lead is None else f", {lead} step{'s' * (lead != 1)} before the verdict"
            sentences.append(f"The first warning was {first['detector']} at step "
                             f"{int(first['step'])}{notice}{_quoted(first['message'])}.")
    return " ".join(sentences)


def _quoted(message: Any) -> str:
    return f": {message.rstrip('.')}" if isinstance(message, str) else ""


def _residual_story(run: RunData) -> str:
    endpoints = residual_endpoints(run)
    if endpoints is None:
        return ""
    table, start, end = endpoints
    growth, across = residual_growth(run)
    last_loop = table.iloc[:, -1]
    story = (f"The last loop's residual norm went from {_fmt(last_loop[start])} at step {start} "
             f"to {_fmt(last_loop[end])} at step {end} (x{_fmt(growth)})")
    if table.shape[1] < 2:  # one loop: no ratio across loops to tell
        return story + "."
    return (story + f"; there, loop {int(table.columns[-1])} carried x{_fmt(across)} the norm of "
                    f"loop {int(table.columns[0])}.")


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3g}"
