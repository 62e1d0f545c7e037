"""The looped collapse read from its mechanism: the loops wash every position into the same
vector (representation collapse), the gradient dies on its way back through them
(vanishing gradient), and the later loops stop changing anything (dead loops).

A collapsed looped model shows all three from its first steps and keeps them; a healthy one
may pass through each for a while (the unigram phase, where positions look alike; FLT's
loops settling on a fixed point, where the later loops and the gradient through them are
small) and leaves the first one as it learns. So: representation collapse warns when it
holds for a few records and is critical when it holds while the loss stalls; the other two
are information, critical only together with a loss or representation symptom.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopdiag.detect.base import UNJUDGED, Detector, DetectorConfig, Finding, Unjudged, loop_values, require
from loopdiag.detect.columns import RecordColumns, codes, judged_streaks
from loopdiag.detect.symptoms import (
    COLLAPSED_DECORRELATION,
    LossTrack,
    ReferenceLineConfig,
    SolvedLineConfig,
    Symptoms,
    collapsed_from,
    dead_from,
    embedding_gradient,
    gradient_ratio,
    solved_line,
)

# A loop whose output moves by under a millionth of its norm is, in float32 (7 digits), a
# loop that changes nothing. Trained FLT's last loops still move ≥ 3e-4 (default suite,
# K=12); a tiny FLT's last loop moved 1e-7 in its first steps (dev seed 0), so: information.
DEAD_UPDATE = 1e-6
# A loop moving the stream by < 1 % is idle: the threshold of the loops-compute study.
IDLE_UPDATE = 0.01
# The gradient reaching loop 1 a millionth of the last loop's: the first loops and the
# embedding no longer learn from the loss (with Adam's eps of 1e-8 their updates vanish).
VANISHED_RATIO = 1e-6


def loops_from(first: int, last: int, verb: str) -> str:
    """'loops 3–12 change', or 'loop 12 changes' when only the last loop is meant."""
    return f"loops {first}–{last} {verb}" if first < last else f"loop {last} {verb}s"


def loop_story(record: Mapping[str, Any], since: int | None = None) -> list[str]:
    """Clauses that say what the loops of this record do, for an event's message."""
    clauses = []
    updates = loop_values(record, "rel_update")
    dead = dead_from(record, DEAD_UPDATE)
    if dead is not None and updates is not None:
        clauses.append(f"{loops_from(dead, len(updates), 'change')} nothing (relative update "
                       f"< {DEAD_UPDATE:.0e})")
    collapsed = collapsed_from(record)
    corr = loop_values(record, "token_corr")
    if collapsed is not None and corr is not None:
        when = f" since step {since}" if since is not None else ""
        clauses.append(f"all positions identical from loop {collapsed} on{when} (token "
                       f"correlation {corr[-1]:.4f} at the last loop)")
    ratio = gradient_ratio(record)
    if ratio is not None and ratio < VANISHED_RATIO:
        clauses.append("no gradient reaches loop 1 (exactly 0)" if ratio == 0 else
                       f"the gradient reaching loop 1 is {ratio:.0e}× the last loop's")
    embedding = embedding_gradient(record)
    if embedding is not None and (ratio is None or ratio < VANISHED_RATIO):
        clauses.append(f"gradient at the embedding {embedding:.0e}")
    return clauses


def sentence(clauses: list[str]) -> str:
    text = "; ".join(clauses)
    return text[:1].upper() + text[1:] + "."


@dataclass(frozen=True)
class RepresentationCollapseConfig(ReferenceLineConfig):
    cooldown: int = 20
    max_decorrelation: float = COLLAPSED_DECORRELATION  # 1 − token correlation, last loop
    # Records the condition must hold before a warning: a collapsed model shows it from its
    # first steps; most healthy ones never (their unigram phase stays above 2e-5), but some
    # enter it while their loss still falls and leave it (a warm-up, or the loss on every
    # loop): they are warned, as nothing at the time tells them from a collapse. What it
    # waits out is a phase of training, so a sparser log waits as many steps instead, over
    # two records at least (`held_for`); token_corr is no noisy reading that needs more.
    # (From `sweep-log5`, every 5th step recorded: warned 20 steps after its positions
    # merged, past 15 % of the run; `sweep-log4`, trained after it, is the held-out check.)
    patience: int = 5
    # Critical once it has held this many records while the loss stalled (improved by
    # under `min_progress` over them, `LossTrack.progress`): identical positions can only
    # predict the token marginals, which such a model learns in its first few steps. Never where
    # a reference shows the data holds little more than those (`context_free_line_holds`).
    window: int = 20
    min_progress: float = 0.02

    def _validate(self) -> None:
        require(0 < self.max_decorrelation < 1,
                f"max_decorrelation must be in (0, 1), got {self.max_decorrelation}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        require(self.window >= self.patience, f"window must be >= patience, got {self.window}")
        require(self.min_progress > 0, f"min_progress must be > 0, got {self.min_progress}")


class RepresentationCollapse(Detector):
    """Every position carrying the same vector at the last loop (1 − `token_corr` <
    `max_decorrelation`) for `patience` records (in a sparser log, `patience` steps over two
    records or more: `held_for`) → warn; for `window` records while the
    loss stalls → critical, unless the reference (`expected_loss`) ended at the
    context-free level itself and stopped learning there (`context_free_line_holds`): then
    identical positions cost the run next to nothing, and its gap to the reference judges
    it. Names the loop from which all positions are identical."""

    name = "representation_collapse"
    mechanism = "representation"
    reads = ("token_corr",)
    config_class = RepresentationCollapseConfig
    config: RepresentationCollapseConfig

    def _reset_state(self) -> None:
        self._loss = LossTrack(window=self.config.window)
        self._streak = 0
        self._since: int | None = None

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._loss.update(record)
        corr = loop_values(record, "token_corr")
        if corr is None or not math.isfinite(corr[-1]):
            return UNJUDGED
        loop = collapsed_from(record, self.config.max_decorrelation)
        if loop is None:
            self._streak, self._since = 0, None
            return None
        self._streak += 1
        if self._since is None:
            self._since = self._last_step
        if not held_for(self.config.patience, self._streak, self._last_step - self._since + 1):
            return None
        return self._collapse(record, corr, loop, self._loss)

    def _collapse(self, record: Mapping[str, Any], corr: np.ndarray, loop: int,
                  loss: LossTrack) -> Finding:
        progress = loss.progress()
        stalled = self._streak >= self.config.window and progress is not None \
            and progress < self.config.min_progress
        clauses = loop_story(record, self._since)
        if not any(clause.startswith("all positions") for clause in clauses):
            clauses.append(f"all positions identical from loop {loop} on since step {self._since}")
        median = loss.current_median()
        if stalled:
            clauses.append(f"the loss stalled at {median:.4g} (changed {100 * progress:+.1f}% "
                           f"over {self.config.window} records)")
        evidence = {"collapsed_from_loop": loop, "since_step": self._since,
                    "records": self._streak, "decorrelation": float(1 - corr[-1]),
                    "loss_progress": progress, "loss_median": median,
                    "thresholds": {"max_decorrelation": self.config.max_decorrelation,
                                   "patience": self.config.patience,
                                   "window": self.config.window,
                                   "min_progress": self.config.min_progress,
                                   "expected_loss": self.config.expected_loss,
                                   "context_free_loss": self.config.context_free_loss}}
        # The monitor says once, at the first record, why a stall here is no collapse.
        collapse = stalled and self.config.context_free_line_holds
        return Finding("critical" if collapse else "warn", sentence(clauses), evidence)

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        last = columns.last_loop("token_corr")
        judged = np.isfinite(last)
        streak, first = judged_streaks(judged, judged & (1 - last < self.config.max_decorrelation))
        steps = columns.last_steps()

        def judge(index: int) -> Finding:
            record = columns.records[index]
            self._streak, self._since = int(streak[index]), columns.last_step(int(first[index]))
            return self._collapse(record, loop_values(record, "token_corr"),
                                  collapsed_from(record, self.config.max_decorrelation),
                                  columns.loss_track_at(index, self.config.window))
        held = held_for(self.config.patience, streak, steps - steps[first] + 1)
        return codes(judged, held, certain=True), judge


def held_for(patience: int, records: Any, steps: Any) -> Any:
    """Whether a condition seen in `records` records in a row, spanning `steps` steps from
    the first of them to the last, has held for `patience`: as many records, or, in a
    log sparser than every step, as many steps over two records or more (arrays too)."""
    return (records >= patience) | ((records >= 2) & (steps >= patience))


@dataclass(frozen=True)
class DeadLoopsConfig(DetectorConfig):
    cooldown: int = 20
    max_update: float = DEAD_UPDATE
    patience: int = 5

    def _validate(self) -> None:
        require(0 < self.max_update < 1, f"max_update must be in (0, 1), got {self.max_update}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")


class DeadLoops(Detector):
    """The loops from k on changing nothing (relative update < `max_update` at every loop
    from k to the last) for `patience` records → info naming k. Information only: the
    recurrence past loop k − 1 is ignored, which a model may afford."""

    name = "dead_loops"
    reads = ("rel_update",)
    config_class = DeadLoopsConfig
    config: DeadLoopsConfig

    def _reset_state(self) -> None:
        self._streak = 0

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        updates = loop_values(record, "rel_update")
        if updates is None or len(updates) < 2:
            return UNJUDGED
        first = dead_from(record, self.config.max_update)
        if first is None:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.config.patience:
            return None
        return self._dead(updates, first)

    def _dead(self, updates: np.ndarray, first: int) -> Finding:
        loops = len(updates)
        return Finding("info", f"{loops_from(first, loops, 'change').capitalize()} nothing (relative update < "
                               f"{self.config.max_update:.0e}) for {self._streak} records: "
                               f"the recurrence past loop {first - 1} is ignored.",
                       {"dead_from_loop": first, "loops": loops, "records": self._streak,
                        "max_relative_update": float(max(updates[first - 1:])),
                        "thresholds": {"max_update": self.config.max_update,
                                       "patience": self.config.patience}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        _, lengths = columns.loops("rel_update")
        judged = lengths >= 2
        streak, _ = judged_streaks(judged, judged & (columns.last_loop("rel_update")
                                                     < self.config.max_update))

        def judge(index: int) -> Finding:
            record = columns.records[index]
            self._streak = int(streak[index])
            return self._dead(loop_values(record, "rel_update"),
                              dead_from(record, self.config.max_update))
        return codes(judged, streak >= self.config.patience, certain=True), judge


@dataclass(frozen=True)
class IdleLoopsConfig(DeadLoopsConfig):
    # After the early phase every model passes through (the unigram phase ends by record
    # 30–50), so a loop still finding its role is not called idle.
    warmup: int = 50
    max_update: float = IDLE_UPDATE
    patience: int = 20


class IdleLoops(DeadLoops):
    """The loops from k on each moving the stream by < `max_update` (1 %) for `patience`
    records → info naming k. A stable looped model can be stable because its later loops
    settle on a fixed point and repeat it; whether they still add accuracy is what
    test-time loop scaling measures (`loopdiag eval RUN --loops 1..K`). Never a collapse."""

    name = "idle_loops"
    config_class = IdleLoopsConfig
    config: IdleLoopsConfig

    def _dead(self, updates: np.ndarray, first: int) -> Finding:
        finding = super()._dead(updates, first)
        first, loops = finding.evidence["dead_from_loop"], finding.evidence["loops"]
        each = " each" if first < loops else ""
        return Finding("info", f"{loops_from(first, loops, 'move').capitalize()} the stream by < "
                               f"{self.config.max_update:.0%}{each} for {self._streak} records "
                               f"(largest {finding.evidence['max_relative_update']:.2g}): the "
                               f"model may be stable because loops past {first - 1} repeat a "
                               f"fixed point; test-time loop scaling tells whether they add "
                               f"anything.", finding.evidence)


@dataclass(frozen=True)
class VanishingGradientConfig(SolvedLineConfig):
    cooldown: int = 20
    max_ratio: float = VANISHED_RATIO  # gradient at loop 1 over the last loop's
    patience: int = 5
    window: int = 20  # records it must hold before it can be critical
    gap: float = 0.10
    min_progress: float = 0.02

    def _validate(self) -> None:
        require(0 < self.max_ratio < 1, f"max_ratio must be in (0, 1), got {self.max_ratio}")
        require(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        require(self.window >= self.patience, f"window must be >= patience, got {self.window}")
        require(self.gap > 0, f"gap must be > 0, got {self.gap}")
        require(self.min_progress > 0, f"min_progress must be > 0, got {self.min_progress}")


class VanishingGradient(Detector):
    """The gradient reaching loop 1 below `max_ratio` × the last loop's (`act_grad_norm`)
    for `patience` records → info; for `window` records with the loss risen ≥ `gap`
    above its best (`Symptoms`) → critical. FLT's loops contract
    towards a fixed point and show small ratios while learning well, so the ratio alone
    is never a collapse."""

    name = "vanishing_gradient"
    mechanism = "gradient"
    reads = ("act_grad_norm",)
    config_class = VanishingGradientConfig
    config: VanishingGradientConfig

    def _reset_state(self) -> None:
        self._symptoms = Symptoms(self.config.gap, self.config.min_progress, self.config.window,
                                  floor=solved_line(self.config))
        self._streak = 0
        self._since: int | None = None

    def _check(self, record: Mapping[str, Any]) -> Finding | None | Unjudged:
        self._symptoms.update(record)
        ratio = gradient_ratio(record)
        if ratio is None:
            return UNJUDGED
        if ratio >= self.config.max_ratio:
            self._streak, self._since = 0, None
            return None
        self._streak += 1
        if self._since is None:
            self._since = self._last_step
        if self._streak < self.config.patience:
            return None
        return self._vanished(record, ratio, self._symptoms)

    def _vanished(self, record: Mapping[str, Any], ratio: float, symptoms: Symptoms | None
                  ) -> Finding:
        """The finding once the ratio has held `patience` records; `symptoms` is read (and
        may be None before) once it has held `window` records."""
        # Identical positions are representation_collapse's to report, with its own timing.
        symptom = (symptoms.current(representation=False)
                   if self._streak >= self.config.window else None)
        now = "now exactly 0: none reaches it" if ratio == 0 else f"now {ratio:.0e}×"
        clauses = [f"the gradient reaching loop 1 has been under {self.config.max_ratio:.0e}× "
                   f"the last loop's since step {self._since} ({now})"]
        embedding = embedding_gradient(record)
        if embedding is not None:
            clauses.append(f"gradient at the embedding {embedding:.0e}")
        if symptom is not None:
            clauses.append(symptom)
        return Finding("critical" if symptom else "info", sentence(clauses),
                       {"ratio": ratio, "since_step": self._since, "records": self._streak,
                        "symptom": symptom,
                        "thresholds": {"max_ratio": self.config.max_ratio,
                                       "patience": self.config.patience,
                                       "window": self.config.window}})

    def _judge_columns(self, columns: RecordColumns) -> tuple[np.ndarray, Callable[[int], Any]]:
        grid, lengths = columns.loops("act_grad_norm")
        last = columns.last_loop("act_grad_norm")
        first_loop = grid[:, 0] if grid.shape[1] else np.full(len(lengths), math.nan)
        judged = (lengths >= 2) & np.isfinite(first_loop) & np.isfinite(last) & (last > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = first_loop / last
        streak, first = judged_streaks(judged, judged & (ratio < self.config.max_ratio))

        def judge(index: int) -> Finding:
            record = columns.records[index]
            self._streak, self._since = int(streak[index]), columns.last_step(int(first[index]))
            symptoms = (columns.symptoms_at(index, self.config.gap, self.config.min_progress,
                                            self.config.window, floor=solved_line(self.config))
                        if self._streak >= self.config.window else None)
            return self._vanished(record, gradient_ratio(record), symptoms)
        return codes(judged, streak >= self.config.patience, certain=True), judge
