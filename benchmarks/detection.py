"""Detection quality: do loopdiag's verdicts match what happened, and do its detectors warn
before a looped model visibly fails while staying quiet on runs that train well? Scored on
fresh seeds and on stored studies, side by side with the loss-spike rules of four widely
used training stacks (`anchor_detectors`), replayed over the same records.

    python benchmarks/detection.py [--seeds 11 12 13 14 15 16 17 18 19 20 21] [--steps 300]
        [--data FILE ...] [--model KEY=VALUE ...] [--train KEY=VALUE ...] [--log-every 1]
        [--workers 2]
        [--cache <out>/runs] [--reuse | --rescore]
        [--study reports/flt-stability/runs reports/loops-compute/runs ...] [--out reports/detection]

Corpus: every setting in `SETTINGS` × seed, the tiny preset (`--model` overrides it), on
the embedded text (`--data`: other text files), `--steps` steps, a record every
`--log-every` steps (default: every step), each
trained once by `run_one` into `<cache>/<setting>-s<seed>/` (one torch thread per process,
`--workers` processes). `--reuse` keeps finished run folders of the same steps, text and
model. The cache defaults to `<out>/runs`: each report's corpus is committed beside it as
the studies' records are (config, events, verdict and `metrics.parquet`; the JSONL and the
checkpoints stay with whoever trained it). `--rescore` scores those records as they were
recorded, from a fresh clone, without training and without the text (its hash, length and
context-free loss are in each run's config), so a set trained on files another machine
lacks, or holds in another version, is scored all the same; the report names the command
that trained them, which the cache keeps (`corpus.json`). Scoring is offline: the
detectors are replayed over `read_records(run_dir)`, so it is cheap and repeatable and
cannot depend on what fired live. Each study (`--study`, a suite's run store; skipped when
absent) is replayed the same way.

Labels come from the training loss alone, never from a detector output, and were written
down before any scoring. Smoothing is that of `ground_truth_onset`: an EMA of span 20
records, non-finite losses left out of it.
- "rose": `ground_truth_onset` finds an onset: the first step from which the smoothed loss
  stays ≥ 10 % above its running best (or the loss is non-finite) to the end.
- "failed to train": no such onset, but the run's smoothed loss at its last record is
  ≥ 10 % above the reference's. Corpus: the reference is `standard` (the compute-matched
  non-looped model, lr 3e-3, grad clip 1) trained with the same seed, hence on the same
  batches, compared at the same step; onset: the first step from which the run stays
  ≥ 10 % above it (or non-finite) to the end. A study: the reference is the healthy one-loop
  model of the same seed, the final smoothed loss of its `standard` K=1 run at lr 3e-3
  (the median if several); onset: the first step from which the run's smoothed loss stays
  ≥ 10 % above that number. This is the FLT paper's collapse, a model that never learns,
  which has no best to rise from. (Until the loops-compute study's third seed the study
  reference was the median over all seeds. That seed's one-loop model ended at 0.845
  against 1.238 and 1.427, and the median labelled the seed-1 one-loop runs themselves
  failed. On the FLT stability study both give the same 384 labels.)
- "healthy": neither. Both other labels are failures.

Held-out seeds: the corpus is scored on seeds ≥ 11 only. Seed 0 set the thresholds of the
detectors that have fitted ones (`residual_blowup`, `update_size`; see their configs) and
was the development set of the mechanism detectors, whose thresholds are mechanisms
(float32 rounding, Adam's eps, the labels' 10 % gap; see `loopdiag.detect.symptoms`).
Seeds 1–10 were scored by earlier versions of the detectors. Each later change to a
detector came from a set that is in-sample for it, and was checked on seeds or whole sets
trained and scored only after it; `docs/held-out.md` lists every change and every set held
out whole (`STUDIES` and the corpora under `reports/detection/`), in the order they were
made, with what each showed when first scored.

Verdicts (the end-of-run judgement a user reads), per set of runs, each run judged as a
suite judges it: without a reference, and with one (`expected_loss`: corpus, the seed-0
`standard` reference's final smoothed loss, a dev run; a study, the final smoothed loss of
the one-loop run of the same architecture and seed at the suite's gentlest learning rate no
higher than the run's own, as `loopdiag run` sets it; and that run's loss curve, which
`behind_reference` reads). Targets: ≥ 99 % of failed
runs judged not stable; zero healthy runs judged collapsed; runs that never train warned
within the first 15 % of their steps; late collapses ("rose") warned before onset on ≥ 95 %.
A run that never trained is one labelled "failed to train" whose smoothed loss never got
10 % (the labels' gap) below its data's context-free loss (any such run, when that loss is
unknown): the model that never learns. The others labelled so trained, and ended behind
their reference; they count among the failed runs, and how many were warned within 15 %
is shown beside, with no target: such a run is learning, and whether it will end behind
is a comparison with a reference's final loss (its curve tells only a run stuck at token
statistics).

Per detector set (loopdiag's defaults together, each alone, each anchor):
- recall before onset: failures with a warn or critical event at a step ≤ onset; also
  within onset + 20 steps;
- median lead: onset − first alarm step, over failures warned at or before onset;
- false alarms: warn/critical events on healthy runs per 10k healthy steps, and healthy
  runs with at least one.
These are scored without a reference, so `behind_reference`, which reads only a
reference's curve, has no row; its warnings on healthy runs are added to the defaults'
in the target line's "with a reference" count.
Targets: ≤ 1 false warning per 10k healthy steps for the defaults together, and against
every anchor: better on at least one of recall before onset, lead and false-alarm rate,
worse on none. Each axis is compared run by run, on the same runs: recall on the failures
one set caught and the other did not (exact McNemar), false alarms on the healthy runs
where one set alarmed fewer times than the other, lead on the failures both caught before
onset where one warned earlier (sign tests); one set is better or worse on an axis only
where that two-sided test gives p < 0.05, and otherwise neither. Lead is not compared
where no failure was caught by both before onset: a median over different runs compares
the runs, not the detectors. Where no failure can be warned before onset, every onset at
the run's first record (the loops-compute study), recall before onset is zero for every
detector by construction and recall by the end of the run takes its place.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import multiprocessing
import shlex
import shutil
import statistics
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from loopdiag.detect import (
    DETECTORS,
    NonFinite,
    anchor_detectors,
    ground_truth_onset,
    replay,
)
from loopdiag.detect.base import Ema, is_int, raw_scalar
from loopdiag.detect.verdict import ONSET_EMA_SPAN, ONSET_GAP
from loopdiag.store import read_records
from loopdiag.store._files import CONFIG_FILE, SUITE_FILE
from loopdiag.store.reference import (
    best_known_candidate, chosen_reference, context_free_loss, lowest, recorded_losses, reference_candidate,
)

ALARM_SEVERITIES = ("warn", "critical")
# Detectors that judge only against a reference's loss curve: their alarms exist only in
# the "with reference" mode, and are counted there beside the others (`reference_alarms`).
REFERENCE_ONLY = frozenset({"behind_reference"})
DEFAULT_STEPS = 300
CORPUS_FILE = "corpus.json"  # in the cache: the command that last trained runs into it
ONSET_SLACK = 20  # steps after onset that still count for the "within" recall
PER_STEPS = 10_000
TARGET_RECALL = 0.95  # late collapses ("rose") warned before onset
TARGET_NOT_STABLE = 0.99  # failed runs judged not stable
EARLY_FRACTION = 0.15  # runs that never train: first warning within this share of their steps
TARGET_FALSE_ALARMS = 1.0  # per PER_STEPS healthy steps
HELD_OUT_FROM_SEED = 11  # seed 0: thresholds and development; seeds 1-10 scored earlier versions
REFERENCE_SEED = 0  # the corpus reference's expected loss comes from this (dev) seed
ALL_DEFAULTS = "loopdiag (all defaults)"
# Two detector sets differ on an axis only where the runs say so: a two-sided paired test
# below this p (see `compare`).
SIGNIFICANCE = 0.05
LEAD_AXIS = "lead on the failures both caught before onset"
RUNS_LISTED = 12  # a report line names this many runs, then says "and more"


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str
    n_loops: int
    lr: float
    grad_clip: float | None
    expected: str  # what the setting was chosen to show; the label comes from the loss
    model_overrides: tuple[tuple[str, Any], ...] = ()
    lr_ramp: bool = False  # the lr rises linearly from 0 to `lr` over the whole run

    def train_config(self, steps: int) -> dict[str, Any]:
        # A cosine schedule whose warm-up never ends and whose floor is its peak: a pure ramp.
        ramp = dict(schedule="cosine", warmup_steps=steps - 1, min_lr_ratio=1.0) if self.lr_ramp else {}
        return dict(steps=steps, grad_clip=self.grad_clip, **ramp)


REFERENCE = "standard-k04-lr3e-3"
SETTINGS = (
    Setting(REFERENCE, "standard", 4, 3e-3, 1.0, "healthy"),
    Setting("looped-k04-lr3e-3", "looped", 4, 3e-3, 1.0, "healthy"),
    Setting("flt-k04-lr3e-3", "flt", 4, 3e-3, 1.0, "healthy"),
    # No inter-loop norm at a high lr: the stream grows while the loss keeps falling, the
    # healthy run a residual rule is most likely to mistake for a collapse.
    Setting("looped-scaled-k04-lr3e-2-noclip", "looped-scaled", 4, 3e-2, None, "healthy"),
    Setting("looped-k04-lr3e-2-noclip", "looped", 4, 3e-2, None, "collapse"),
    Setting("looped-k08-lr5e-2-noclip", "looped", 8, 5e-2, None, "collapse"),
    Setting("looped-scaled-k08-lr3e-1-noclip", "looped-scaled", 8, 3e-1, None, "collapse"),
    # Very high lr without the logit soft-cap: the loss explodes within the first steps.
    Setting("looped-k04-lr1-noclip-nocap", "looped", 4, 1.0, None, "collapse",
            (("logit_softcap", None),)),
    # The main job's failure at a modest lr: many loops wash the positions together.
    Setting("looped-k12-lr3e-3", "looped", 12, 3e-3, 1.0, "collapse"),
    Setting("flt-k12-lr3e-3", "flt", 12, 3e-3, 1.0, "healthy"),
    # Late collapses: the lr ramps up past what the model survives (without the soft-cap,
    # which otherwise bounds the loss into a plateau); the loss rises from its best and
    # does not come back.
    Setting("standard-k04-ramp3-noclip-nocap", "standard", 4, 3.0, None, "late collapse",
            (("logit_softcap", None),), lr_ramp=True),
    Setting("flt-k04-ramp3-noclip-nocap", "flt", 4, 3.0, None, "late collapse",
            (("logit_softcap", None),), lr_ramp=True),
    Setting("looped-k04-ramp2-noclip-nocap", "looped", 4, 2.0, None, "late collapse",
            (("logit_softcap", None),), lr_ramp=True),
)


def run_name(setting: Setting, seed: int) -> str:
    return f"{setting.name}-s{seed}"


# --- the corpus ------------------------------------------------------------------------

# What a setting decides about its training; `--train` may not override it.
SETTING_TRAIN_KEYS = ("steps", "lr", "grad_clip", "seed", "n_loops")


@dataclass(frozen=True)
class CorpusSpec:
    """What every corpus run shares beyond its setting: the text, the model size and the
    training recipe."""

    steps: int
    data: tuple[str, ...] = ()  # text files; none: the embedded corpus
    model: tuple[tuple[str, Any], ...] = ()  # overrides of the tiny preset
    train: tuple[tuple[str, Any], ...] = ()  # overrides of TrainConfig's defaults
    log_every: int = 1  # steps per record of the probes (and of the loss the labels read)

    def model_config(self, setting: Setting) -> dict[str, Any]:
        from loopdiag.models.config import preset

        return vars(preset("tiny", **{**dict(self.model), **dict(setting.model_overrides),
                                      "n_loops": setting.n_loops}))

    def train_config(self, setting: Setting) -> dict[str, Any]:
        """The TrainConfig fields the run sets: the recipe, then the setting's own (a ramp's
        schedule is what makes it a late collapse, so it wins over the recipe's)."""
        return {**dict(self.train), **setting.train_config(self.steps)}


def train_run(setting: Setting, seed: int, spec: CorpusSpec, run_dir: Path) -> float:
    """Train one corpus run into `run_dir`; its wall time in seconds."""
    import torch  # heavy imports only where training happens: scoring needs none of them

    from loopdiag.data import load_corpus
    from loopdiag.models.config import ModelConfig
    from loopdiag.run.runner import RunSpec, run_one
    from loopdiag.train import TrainConfig

    torch.set_num_threads(1)  # two processes on two cores: extra threads only spin-wait
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    run_one(RunSpec(setting.arch, setting.n_loops, seed, setting.lr),
            ModelConfig(**spec.model_config(setting)),
            TrainConfig(**spec.train_config(setting)), load_corpus(spec.data or None), run_dir,
            log_every=spec.log_every)
    return time.perf_counter() - start


def is_finished(run_dir: Path, setting: Setting, spec: CorpusSpec, data_sha256: str) -> bool:
    """A run folder that closed with a verdict after training `setting` as `spec` asks: the
    same steps and recipe, model and text, the text told by its hash (where its files lie
    differs from machine to machine); a run of other data, size or recipe is retrained, not
    reused."""
    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return False
    model = spec.model_config(setting)
    # Through TrainConfig, as the run recorded it: a list where a tuple was given.
    train = json.loads(json.dumps(spec.train_config(setting)))
    return ((run_dir / "summary.json").is_file()
            and {key: config["train"].get(key) for key in train} == train
            and config["data"].get("sha256") == data_sha256
            and config["probes"].get("log_every") == spec.log_every
            and {key: config["model"].get(key) for key in model} == model)


def recorded_corpus(seeds: Sequence[int], cache: Path) -> dict[str, Any]:
    """The stored config of the reference's seed-0 run, for scoring a corpus as it was
    recorded (`--rescore`): every run the seeds need has finished, all on one text and one
    length. ValueError otherwise, naming what is not so."""
    reference = next(setting for setting in SETTINGS if setting.name == REFERENCE)
    names = [run_name(setting, seed) for setting in SETTINGS for seed in seeds]
    names.append(run_name(reference, REFERENCE_SEED))
    missing = [name for name in names if not (cache / name / "summary.json").is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{cache} holds no finished run {', '.join(missing[:3])}{more}: "
                         f"train them first (without --rescore)")
    configs = [json.loads((cache / name / "config.json").read_text(encoding="utf-8"))
               for name in names]
    recorded = {(config["data"].get("sha256"), config["train"]["steps"]) for config in configs}
    if len(recorded) > 1:
        raise ValueError(f"the runs in {cache} were trained on {len(recorded)} different texts "
                         f"or lengths: one corpus is scored at a time")
    return configs[-1]


def build_corpus(seeds: Sequence[int], spec: CorpusSpec, data_sha256: str, cache: Path,
                 reuse: bool, workers: int) -> float | None:
    """Train the runs the cache lacks; the wall time, or None when all were reused."""
    # Most loops first, so the longest runs do not end up alone at the tail.
    jobs = [(setting, seed) for setting in sorted(SETTINGS, key=lambda s: -s.n_loops)
            for seed in seeds]
    reference = next(setting for setting in SETTINGS if setting.name == REFERENCE)
    if REFERENCE_SEED not in seeds:  # the dev run the reference's expected loss comes from
        jobs.append((reference, REFERENCE_SEED))
    todo = [(setting, seed) for setting, seed in jobs
            if not (reuse and is_finished(cache / run_name(setting, seed), setting, spec, data_sha256))]
    print(f"corpus: {len(jobs)} runs, {len(jobs) - len(todo)} reused from {cache}, "
          f"{len(todo)} to train with {workers} process(es)", flush=True)
    if not todo:
        return None
    start = time.perf_counter()
    # spawn: a fresh interpreter per worker, no torch state inherited through fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(train_run, setting, seed, spec, cache / run_name(setting, seed)):
                   run_name(setting, seed) for setting, seed in todo}
        for done, future in enumerate(as_completed(futures), 1):
            print(f"  [{done:>2}/{len(todo)}] {futures[future]:<40} {future.result():5.1f} s "
                  f"(elapsed {time.perf_counter() - start:4.0f} s)", flush=True)
    return time.perf_counter() - start


# --- labels (from the loss only) -------------------------------------------------------

@dataclass(frozen=True)
class Label:
    kind: str  # "healthy" | "rose" | "failed to train"
    onset: int | None

    @property
    def collapsed(self) -> bool:
        return self.kind != "healthy"


def loss_series(records: Iterable[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the records that carry a loss."""
    pairs = [(int(r["step"]), float(r["loss"])) for r in records
             if r.get("step") is not None and r.get("loss") is not None]
    return [step for step, _ in pairs], [loss for _, loss in pairs]


def smoothed_losses(losses: Sequence[float], ema_span: int = ONSET_EMA_SPAN) -> list[float]:
    """The EMA at each record as `ground_truth_onset` keeps it (non-finite losses skipped;
    NaN until the first finite one)."""
    ema, values = Ema(ema_span), []
    for loss in losses:
        if math.isfinite(loss):
            ema.update(loss)
        values.append(math.nan if ema.value is None else ema.value)
    return values


def failed_to_train_onset(steps: Sequence[int], losses: Sequence[float],
                          reference_steps: Sequence[int], reference_losses: Sequence[float],
                          *, gap: float = ONSET_GAP) -> int | None:
    """The first step from which the run's smoothed loss stays ≥ (1 + gap) × the reference's
    at the same step (or the loss is non-finite) to the end; None if its last record is not
    so."""
    reference = dict(zip(reference_steps, smoothed_losses(reference_losses)))
    failed = []
    for step, loss, smoothed in zip(steps, losses, smoothed_losses(losses)):
        if step not in reference:
            raise ValueError(f"the reference run has no loss at step {step}")
        failed.append(not math.isfinite(loss)
                      or smoothed - reference[step] >= gap * abs(reference[step]))
    if not failed or not failed[-1]:
        return None
    healthy = np.flatnonzero(~np.array(failed))
    return steps[healthy[-1] + 1 if len(healthy) else 0]


def label_run(records: Sequence[Mapping[str, Any]],
              reference_records: Sequence[Mapping[str, Any]]) -> Label:
    steps, losses = loss_series(records)
    onset = ground_truth_onset(losses, steps)
    if onset is not None:
        return Label("rose", onset)
    onset = failed_to_train_onset(steps, losses, *loss_series(reference_records))
    return Label("healthy", None) if onset is None else Label("failed to train", onset)


# --- scoring ---------------------------------------------------------------------------

MODES = ("no reference", "with reference")


@dataclass(frozen=True)
class ScoredRun:
    name: str
    group: str  # the corpus setting, or the study's architecture
    expected: str  # what the run was chosen to show ("–" for the study)
    seed: int
    label: Label
    steps: int  # the training steps the detectors judged: the last step with a loss
    first_step: int  # the first step with a loss
    final_smoothed_loss: float
    # At the last record within EARLY_FRACTION of the steps: where a run that never trains
    # must have been warned. The healthy model its label compares it with, at the same step.
    early_smoothed_loss: float
    reference_early_smoothed_loss: float
    # The lowest smoothed loss of the run, and what its data's token frequencies alone give
    # (None when unknown): a run that went well below the latter trained, whatever its label.
    lowest_smoothed_loss: float
    context_free_loss: float | None
    alarms: tuple[dict[str, Any], ...]  # replayed warn/critical events (no reference), in step order
    reference_alarms: tuple[dict[str, Any], ...]  # those of REFERENCE_ONLY, with the reference
    verdicts: Mapping[str, Mapping[str, Any]]  # by mode

    @property
    def trained(self) -> bool:
        """Its smoothed loss went the labels' gap or more below its data's context-free loss
        (False when that loss is unknown)."""
        return (self.context_free_loss is not None
                and self.lowest_smoothed_loss <= (1 - ONSET_GAP) * self.context_free_loss)

    @property
    def never_trained(self) -> bool:
        """Failed to train and never trained at all: the FLT paper's collapse."""
        return self.label.kind == "failed to train" and not self.trained

    @property
    def fell_behind(self) -> bool:
        """Failed to train, but trained: it ended ≥ the gap behind its reference."""
        return self.label.kind == "failed to train" and self.trained


def first_alarm(run: ScoredRun, detectors: Collection[str]) -> dict[str, Any] | None:
    return next((alarm for alarm in run.alarms if alarm["detector"] in detectors), None)


@dataclass(frozen=True)
class Score:
    name: str
    collapses: int
    caught_within: int
    # failures whose onset is after their first record: the only ones a detector can warn
    # before onset
    warnable: int
    leads: Mapping[str, int]  # onset − first alarm step, by failed run caught before onset
    healthy_steps: int
    caught_runs: frozenset[str]  # failed runs alarmed at any step
    alarms_by_healthy_run: Mapping[str, int]  # warn/critical events, by healthy run

    @property
    def caught_before(self) -> int:
        return len(self.leads)

    @property
    def caught_by_end(self) -> int:
        return len(self.caught_runs)

    @property
    def healthy_runs(self) -> int:
        return len(self.alarms_by_healthy_run)

    @property
    def false_alarms(self) -> int:
        return sum(self.alarms_by_healthy_run.values())

    @property
    def alarmed_healthy_runs(self) -> int:
        return sum(count > 0 for count in self.alarms_by_healthy_run.values())

    @property
    def median_lead(self) -> float | None:
        """Steps; None when no failure was caught before onset."""
        return statistics.median(self.leads.values()) if self.leads else None

    @property
    def recall_before(self) -> float:
        return self.caught_before / self.collapses if self.collapses else math.nan

    @property
    def recall_within(self) -> float:
        return self.caught_within / self.collapses if self.collapses else math.nan

    @property
    def false_alarm_rate(self) -> float:
        return PER_STEPS * self.false_alarms / self.healthy_steps if self.healthy_steps else math.nan


def score(name: str, runs: Sequence[ScoredRun], detectors: Collection[str]) -> Score:
    collapses = [run for run in runs if run.label.collapsed]
    healthy = [run for run in runs if not run.label.collapsed]
    leads, within, caught = {}, 0, set()
    for run in collapses:
        alarm = first_alarm(run, detectors)
        if alarm is None:
            continue
        caught.add(run.name)
        if alarm["step"] <= run.label.onset:
            leads[run.name] = run.label.onset - alarm["step"]
        if alarm["step"] <= run.label.onset + ONSET_SLACK:
            within += 1
    alarms_per_run = {run.name: sum(a["detector"] in detectors for a in run.alarms) for run in healthy}
    return Score(name=name, collapses=len(collapses), caught_within=within,
                 warnable=sum(run.label.onset > run.first_step for run in collapses), leads=leads,
                 healthy_steps=sum(run.steps for run in healthy),
                 caught_runs=frozenset(caught), alarms_by_healthy_run=alarms_per_run)


def common_leads(ours: Score, anchor: Score) -> tuple[int, float, float] | None:
    """(failures both caught before onset, our median lead on them, the anchor's), or None
    when they caught none in common."""
    common = ours.leads.keys() & anchor.leads.keys()
    if not common:
        return None
    return (len(common), statistics.median(ours.leads[name] for name in common),
            statistics.median(anchor.leads[name] for name in common))


@dataclass(frozen=True)
class Paired:
    """One axis compared run by run: on how many runs ours did better, on how many worse
    (ties left out), and the two-sided sign test's p (exact McNemar for caught or not)."""

    axis: str
    wins: int
    losses: int

    @property
    def p(self) -> float:
        trials = self.wins + self.losses
        return binomtest(self.wins, trials).pvalue if trials else 1.0

    @property
    def outcome(self) -> str:
        """"better", "worse" or "no difference"."""
        if self.p >= SIGNIFICANCE:
            return "no difference"
        return "better" if self.wins > self.losses else "worse"

    def text(self, unit: str) -> str:
        return f"{self.axis} ({unit}: ours on {self.wins}, theirs on {self.losses}, p = {self.p:.2g})"


def paired_axes(ours: Score, anchor: Score) -> list[tuple[Paired, str]]:
    """Each axis as (counts, what a win is), on the same runs. Recall: the failures one set
    alarmed on and the other did not. False alarms: the healthy runs where one set alarmed
    fewer times. Lead: the failures both caught before onset, where one set warned earlier.
    Where no failure can be warned before onset (every onset at the run's first record),
    recall before onset is zero for every detector by construction, and recall is compared
    by the end of the run."""
    if ours.warnable:
        axis, mine, theirs = "recall before onset", set(ours.leads), set(anchor.leads)
    else:
        axis, mine, theirs = "recall by the end of the run", ours.caught_runs, anchor.caught_runs
    axes = [(Paired(axis, len(mine - theirs), len(theirs - mine)), "failures caught by one only")]
    healthy = ours.alarms_by_healthy_run.keys() & anchor.alarms_by_healthy_run.keys()
    fewer = [ours.alarms_by_healthy_run[name] - anchor.alarms_by_healthy_run[name] for name in healthy]
    axes.append((Paired("false-alarm rate", sum(d < 0 for d in fewer), sum(d > 0 for d in fewer)),
                 "healthy runs with fewer alarms"))
    common = ours.leads.keys() & anchor.leads.keys()
    if common:
        earlier = [ours.leads[name] - anchor.leads[name] for name in common]
        axes.append((Paired(LEAD_AXIS, sum(d > 0 for d in earlier), sum(d < 0 for d in earlier)),
                     "failures warned earlier"))
    return axes


def compare(ours: Score, anchor: Score) -> tuple[list[str], list[str]]:
    """(axes where ours is better, axes where it is worse): each axis compared run by run on
    the same runs (`paired_axes`), better or worse only where a two-sided paired test gives
    p < `SIGNIFICANCE`. Lead is compared on the failures both caught before onset (a median
    over different runs compares the runs, not the detectors); with none in common it is
    not compared."""
    axes = [paired for paired, _ in paired_axes(ours, anchor)]
    return ([paired.axis for paired in axes if paired.outcome == "better"],
            [paired.axis for paired in axes if paired.outcome == "worse"])


@dataclass(frozen=True)
class VerdictScore:
    """How the end-of-run verdicts of one set of runs, in one mode, match the labels."""

    mode: str
    failed: int
    failed_not_stable: int
    failed_statuses: Counter
    # (what failed, runs judged not stable, runs): never trained, trained but ended behind, rose
    not_stable_by_failure: tuple[tuple[str, int, int], ...]
    healthy: int
    healthy_collapsed: int
    healthy_not_stable: int
    never_trained: int
    never_trained_early: int  # first warning within EARLY_FRACTION of the run's steps
    fell_behind: int
    fell_behind_early: int
    rose: int
    rose_before_onset: int


def warned_by(run: ScoredRun, mode: str, step: float) -> bool:
    warning = run.verdicts[mode].get("first_warning_step")
    return warning is not None and warning <= step


def score_verdicts(runs: Sequence[ScoredRun], mode: str) -> VerdictScore:
    failed = [run for run in runs if run.label.collapsed]
    healthy = [run for run in runs if not run.label.collapsed]
    never = [run for run in failed if run.never_trained]
    behind = [run for run in failed if run.fell_behind]
    rose = [run for run in failed if run.label.kind == "rose"]

    return VerdictScore(
        mode=mode, failed=len(failed),
        failed_not_stable=sum(run.verdicts[mode]["status"] != "stable" for run in failed),
        failed_statuses=Counter(run.verdicts[mode]["status"] for run in failed),
        not_stable_by_failure=tuple(
            (kind, sum(run.verdicts[mode]["status"] != "stable" for run in those), len(those))
            for kind, those in (("never trained", never), ("trained but ended behind", behind),
                                ("rose", rose))),
        healthy=len(healthy),
        healthy_collapsed=sum(run.verdicts[mode]["status"] == "collapsed" for run in healthy),
        healthy_not_stable=sum(run.verdicts[mode]["status"] != "stable" for run in healthy),
        never_trained=len(never),
        never_trained_early=sum(warned_by(run, mode, EARLY_FRACTION * run.steps) for run in never),
        fell_behind=len(behind),
        fell_behind_early=sum(warned_by(run, mode, EARLY_FRACTION * run.steps) for run in behind),
        rose=len(rose), rose_before_onset=sum(warned_by(run, mode, run.label.onset) for run in rose))


def smoothed_at(records: Sequence[Mapping[str, Any]], step: float) -> float:
    """The smoothed loss at the last record at or before `step` (NaN if none)."""
    steps, losses = loss_series(records)
    return value_at(steps, smoothed_losses(losses), step)


def value_at(steps: Sequence[int], values: Sequence[float], step: float) -> float:
    before = [value for at, value in zip(steps, values) if at <= step]
    return before[-1] if before else math.nan


def judged_run(name: str, group: str, expected: str, seed: int, records: list[dict[str, Any]],
               label: Label, expected_loss: float | None, context_free_loss: float | None,
               label_references: Sequence[Sequence[Mapping[str, Any]]] = (),
               reference_losses: Sequence[tuple[int, float]] | None = None,
               best_known_loss: float | None = None) -> ScoredRun:
    """Replay the defaults (both modes) and the anchors over one run's records; both modes
    know the data's context-free loss, as a run trained today records it; the "with
    reference" mode knows `expected_loss`, the (step, loss) curve it came from and the best
    known loss (`store.reference_record`). `label_references`: the records of the healthy
    run(s) its label compares it with."""
    from loopdiag.analysis.rejudge import judge

    verdicts = {}
    for mode, loss, curve, best in zip(MODES, (None, expected_loss), (None, reference_losses),
                                       (None, best_known_loss)):
        events, judged = judge(records, {}, loss, finished=True, context_free_loss=context_free_loss,
                               reference_losses=curve, best_known_loss=best)
        verdicts[mode] = judged
        if mode == MODES[0]:
            alarms = [event for event in events if event.severity in ALARM_SEVERITIES]
        else:
            reference_alarms = [event for event in events if event.severity in ALARM_SEVERITIES
                                and event.detector in REFERENCE_ONLY]
    anchor_events = replay(records, anchor_detectors())
    alarms = sorted([*alarms, *(e for e in anchor_events if e.severity in ALARM_SEVERITIES)],
                    key=lambda event: event.step)
    steps, losses = loss_series(records)
    smoothed = smoothed_losses(losses)
    early_step = EARLY_FRACTION * steps[-1]
    reference_early = [smoothed_at(reference, early_step) for reference in label_references]
    return ScoredRun(name=name, group=group, expected=expected, seed=seed, label=label,
                     steps=steps[-1], first_step=steps[0], final_smoothed_loss=smoothed[-1],
                     early_smoothed_loss=value_at(steps, smoothed, early_step),
                     reference_early_smoothed_loss=(statistics.median(reference_early)
                                                    if reference_early else math.nan),
                     lowest_smoothed_loss=min((value for value in smoothed if math.isfinite(value)),
                                              default=math.nan),
                     context_free_loss=context_free_loss,
                     alarms=tuple(event.to_dict() for event in alarms),
                     reference_alarms=tuple(event.to_dict() for event in reference_alarms),
                     verdicts=verdicts)


def final_smoothed(records: Sequence[Mapping[str, Any]]) -> float:
    _, losses = loss_series(records)
    return smoothed_losses(losses)[-1]


def records_until(records: list[dict[str, Any]], run_dir: Path, until: float | None
                  ) -> list[dict[str, Any]]:
    """`records` up to `until` × the training steps the run's config names (all with None)."""
    if until is None:
        return records
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    last = until * config["train"]["steps"]
    return [record for record in records if is_int(record.get("step")) and record["step"] <= last]


def recorded_statistics(run_dir: Path, kept: Callable[[str], bool] | None = None
                        ) -> list[dict[str, Any]]:
    """The run's records; with `kept`, only the statistics it keeps (the step and the loss
    always): what a model that records less gives the detectors (`missing_statistics.py`)."""
    records = read_records(run_dir)
    if kept is None:
        return records
    return [{key: value for key, value in record.items() if key in ("step", "loss") or kept(key)}
            for record in records]


def score_corpus(seeds: Sequence[int], cache: Path, context_free_loss: float,
                 kept: Callable[[str], bool] | None = None,
                 until: float | None = None) -> list[ScoredRun]:
    """Every setting × seed replayed (with `kept`: from those statistics only; with
    `until`: every run, references included, as if it had stopped after that fraction of
    its training steps, as a verdict read mid-run sees it, and labelled there)."""
    by_name = {setting.name: setting for setting in SETTINGS}

    def records_of(run_dir: Path, statistics: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        return records_until(recorded_statistics(run_dir, statistics), run_dir, until)

    reference_dir = cache / run_name(by_name[REFERENCE], REFERENCE_SEED)
    reference_curve = records_of(reference_dir)
    expected_loss, reference_losses = final_smoothed(reference_curve), recorded_losses(reference_dir)
    if until is not None and reference_losses is not None:
        last = reference_curve[-1]["step"]
        reference_losses = tuple(pair for pair in reference_losses if pair[0] <= last) or None
    runs = []
    for seed in seeds:
        reference_records = records_of(cache / run_name(by_name[REFERENCE], seed))
        reference_label = label_run(reference_records, reference_records)
        if reference_label.collapsed:
            raise ValueError(f"reference run {run_name(by_name[REFERENCE], seed)} is not healthy "
                             f"(onset at step {reference_label.onset}): cannot label seed {seed}")
        for setting in SETTINGS:
            records = records_of(cache / run_name(setting, seed), kept)
            runs.append(judged_run(run_name(setting, seed), setting.name, setting.expected, seed,
                                   records, label_run(records, reference_records), expected_loss,
                                   context_free_loss, [reference_records], reference_losses))
    return runs


def score_all(runs: Sequence[ScoredRun]) -> list[Score]:
    anchors = [detector.name for detector in anchor_detectors()]
    return ([score(ALL_DEFAULTS, runs, set(DETECTORS))]
            + [score(name, runs, {name}) for name in DETECTORS if name not in REFERENCE_ONLY]
            + [score(name, runs, {name}) for name in anchors])


# --- the study ---------------------------------------------------------------------------

STUDY_REFERENCE = ("standard", 1, 3e-3)  # the healthy one-loop model: arch, K, lr
# The reference study (the thresholds' in-sample set, see "Held-out seeds"), a study on
# other data and length that no threshold was set or changed on, and the held-out sweeps of
# the default suite on other text, sizes, optimizers, horizons and seeds, each described in
# docs/held-out.md.
STUDIES = (Path("reports/flt-stability/runs"), Path("reports/loops-compute/runs"),
           Path("reports/detection/sweep-vim/runs"), Path("reports/detection/sweep-notes/runs"),
           Path("reports/detection/sweep-long/runs"), Path("reports/detection/sweep-huginn/runs"),
           Path("reports/detection/sweep-maven/runs"), Path("reports/detection/sweep-bashcomp/runs"),
           Path("reports/detection/sweep-yaml/runs"), Path("reports/detection/sweep-rst/runs"),
           Path("reports/detection/sweep-uapi/runs"), Path("reports/detection/sweep-man3/runs"),
           Path("reports/detection/sweep-pciids/runs"), Path("reports/detection/sweep-fortunes/runs"),
           Path("reports/detection/sweep-gcide/runs"), Path("reports/detection/sweep-gdal/runs"),
           Path("reports/detection/sweep-asyncio/runs"), Path("reports/detection/sweep-small/runs"),
           Path("reports/detection/sweep-docs400/runs"), Path("reports/detection/sweep-perl/runs"),
           Path("reports/detection/sweep-perl-small/runs"), Path("reports/detection/sweep-bf16/runs"),
           Path("reports/detection/sweep-log5/runs"), Path("reports/detection/sweep-log4/runs"),
           Path("reports/detection/sweep-accum/runs"), Path("reports/detection/sweep-short80/runs"),
           Path("reports/detection/sweep-short50/runs"), Path("reports/detection/sweep-d384/runs"),
           Path("reports/detection/sweep-d512/runs"), Path("reports/detection/sweep-email/runs"),
           Path("reports/detection/sweep-noclip/runs"), Path("reports/detection/sweep-archs/runs"),
           Path("reports/detection/user-model-go/runs"), Path("reports/detection/user-model-cpp/runs"),
           Path("reports/detection/user-model-info/runs"), Path("reports/detection/user-model-gitweb/runs"),
           Path("reports/detection/hf-albert-dpkg/runs"), Path("reports/detection/user-model-ramp/runs"),
           Path("reports/detection/user-model-bpe/runs"), Path("reports/detection/user-model-bpe-nodejs/runs"),
           Path("reports/detection/user-model-perl/runs"), Path("reports/detection/sweep-noisy/runs"),
           Path("reports/detection/user-model-stdlib/runs"), Path("reports/detection/user-model-short/runs"),
           Path("reports/detection/sweep-distutils/runs"), Path("reports/detection/sweep-gentle/runs"),
           Path("reports/detection/sweep-locales/runs"), Path("reports/detection/sweep-vimsyntax/runs"),
           Path("reports/detection/sweep-locales-mz/runs"), Path("reports/detection/sweep-locales-gl/runs"),
           Path("reports/detection/sweep-muon/runs"), Path("reports/detection/user-model-scipy/runs"),
           Path("reports/detection/sweep-pandas/runs"))


def study_name(path: Path) -> str:
    """The suite's name, from its manifest."""
    return json.loads((path / SUITE_FILE).read_text(encoding="utf-8"))["name"]


def study_label(records: Sequence[Mapping[str, Any]], healthy_loss: float) -> Label:
    """"rose" by `ground_truth_onset`; else "failed to train" when the final smoothed loss is
    ≥ 10 % above `healthy_loss` (onset: the first step from which it stays there); else
    healthy."""
    steps, losses = loss_series(records)
    onset = ground_truth_onset(losses, steps)
    if onset is not None:
        return Label("rose", onset)
    onset = failed_to_train_onset(steps, losses, steps, [healthy_loss] * len(steps))
    return Label("healthy", None) if onset is None else Label("failed to train", onset)


def score_study(study: Path, kept: Callable[[str], bool] | None = None
                ) -> tuple[list[ScoredRun], dict[int, float]]:
    """Every finished run of the study whose seed has a healthy one-loop run, replayed (with
    `kept`: from those statistics only); (runs, the healthy one-loop loss by seed). Each
    run's reference is `loopdiag.store.reference`'s (`chosen_reference`): the one-loop run of
    its architecture and seed at the gentlest learning rate no higher than its own, whose
    final smoothed loss is its expected loss, and that run's loss curve."""
    manifest = json.loads((study / SUITE_FILE).read_text(encoding="utf-8"))
    cells = {entry["run_id"]: entry["cell"] for entry in manifest["runs"]}
    finished = {run_id: recorded_statistics(study / run_id, kept) for run_id in cells
                if (study / run_id / "summary.json").is_file()}
    finished = {run_id: records for run_id, records in finished.items() if records}
    configs = {run_id: json.loads((study / run_id / "config.json").read_text(encoding="utf-8"))
               for run_id in finished}
    finals = {run_id: final_smoothed(records) for run_id, records in finished.items()}
    arch, n_loops, lr = STUDY_REFERENCE
    by_seed: dict[int, list[str]] = {}
    for run_id in finished:
        cell = cells[run_id]
        if (cell["arch"], cell["n_loops"]) == (arch, n_loops) and math.isclose(cell["lr"], lr):
            by_seed.setdefault(cell["seed"], []).append(run_id)
    if not by_seed:
        raise ValueError(f"{study} has no {arch} K={n_loops} lr {lr:g} run to label against")
    healthy = {seed: statistics.median(finals[run_id] for run_id in run_ids)
               for seed, run_ids in sorted(by_seed.items())}

    # As `store.reference.finished_final_loss`: a run that diverged (a non-finite value where
    # `non_finite` reads) is no bar.
    diverged = {run_id for run_id, records in finished.items()
                if any(value is not None and not math.isfinite(value) for record in records
                       for value in (raw_scalar(record, key) for key in NonFinite.reads))}

    def finished_candidates(run_id: str, candidate: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
                            ) -> list[tuple[Mapping[str, Any], float, str]]:
        return [(cells[other], finals[other], other) for other in finished if other != run_id
                and other not in diverged and math.isfinite(finals[other]) and candidate(cells[other], cells[run_id])]

    def best_known(run_id: str) -> str | None:
        best = lowest(finished_candidates(run_id, best_known_candidate))
        return None if best is None else best[0]

    unlabelled = sorted({cells[run_id]["seed"] for run_id in finished} - healthy.keys())
    if unlabelled:
        print(f"{study}: the runs of seed(s) {', '.join(map(str, unlabelled))} are left out: "
              f"no finished {arch} K={n_loops} lr {lr:g} run of their seed to label against")
    runs = []
    for run_id, records in finished.items():
        if cells[run_id]["seed"] not in healthy:
            continue
        reference = chosen_reference(finished_candidates(run_id, reference_candidate))
        reference_id = None if reference is None else reference[0]
        best_known_id = best_known(run_id)
        best_known_loss = (finals[best_known_id] if reference_id is not None and best_known_id is not None
                           and finals[best_known_id] < finals[reference_id] else None)
        runs.append(judged_run(
            run_id, cells[run_id]["arch"], "–", cells[run_id]["seed"], records,
            study_label(records, healthy[cells[run_id]["seed"]]),
            None if reference_id is None else finals[reference_id], context_free_loss(configs[run_id]),
            [finished[healthy_id] for healthy_id in by_seed[cells[run_id]["seed"]]],
            None if reference_id is None else recorded_losses(study / reference_id), best_known_loss))
    return runs, healthy


# --- output ----------------------------------------------------------------------------

COLUMNS = ("detector set", "caught before onset", f"within onset+{ONSET_SLACK}", "by end of run",
           "median lead (steps)", f"false alarms / {PER_STEPS // 1000}k healthy steps",
           "healthy runs alarmed")
VERDICT_COLUMNS = ("runs", "mode", "failed runs judged not stable", "failed runs by verdict",
                   "healthy runs judged collapsed", "healthy runs judged not stable",
                   f"never trained: warned within {EARLY_FRACTION:.0%} of steps",
                   f"trained, ended behind: warned within {EARLY_FRACTION:.0%} of steps",
                   "rose: warned before onset")


def counted(count: int, one: str, many: str) -> str:
    """'1 run was', '3 runs were': the count with the words that agree with it."""
    return f"{count} {one if count == 1 else many}"


def fraction(count: int, total: int) -> str:
    return f"{count}/{total} ({100 * count / total:.0f}%)" if total else "–"


def table_rows(scores: Sequence[Score]) -> list[list[str]]:
    return [[s.name, fraction(s.caught_before, s.collapses), fraction(s.caught_within, s.collapses),
             fraction(s.caught_by_end, s.collapses),
             "–" if s.median_lead is None else f"{s.median_lead:g}",
             f"{s.false_alarm_rate:.1f} ({s.false_alarms})",
             f"{s.alarmed_healthy_runs}/{s.healthy_runs}"] for s in scores]


def verdict_rows(name: str, scores: Sequence[VerdictScore]) -> list[list[str]]:
    return [[name, v.mode, fraction(v.failed_not_stable, v.failed),
             ", ".join(f"{n} {status}" for status, n in v.failed_statuses.most_common()) or "–",
             f"{v.healthy_collapsed}/{v.healthy}", f"{v.healthy_not_stable}/{v.healthy}",
             fraction(v.never_trained_early, v.never_trained),
             fraction(v.fell_behind_early, v.fell_behind),
             fraction(v.rose_before_onset, v.rose)] for v in scores]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [list(header), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, scores: Sequence[Score]) -> None:
    anchors = {detector.name for detector in anchor_detectors()}
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["detector_set", "kind", "collapses", "caught_before_onset",
                         "recall_before_onset", f"caught_within_onset_plus_{ONSET_SLACK}",
                         f"recall_within_onset_plus_{ONSET_SLACK}", "caught_by_end_of_run",
                         "median_lead_steps",
                         "healthy_runs", "healthy_steps", "false_alarm_events",
                         "false_alarms_per_10k_healthy_steps", "healthy_runs_alarmed"])
        for s in scores:
            writer.writerow([s.name, "anchor" if s.name in anchors else "loopdiag", s.collapses,
                             s.caught_before, f"{s.recall_before:.4f}", s.caught_within,
                             f"{s.recall_within:.4f}", s.caught_by_end,
                             "" if s.median_lead is None else f"{s.median_lead:g}",
                             s.healthy_runs, s.healthy_steps, s.false_alarms,
                             f"{s.false_alarm_rate:.3f}", s.alarmed_healthy_runs])


MET = "**met**", "**not met**"


def verdict_target_lines(name: str, verdict_scores: Sequence[VerdictScore]) -> list[str]:
    lines = []
    for v in verdict_scores:
        share = v.failed_not_stable / v.failed if v.failed else math.nan
        early = v.never_trained_early / v.never_trained if v.never_trained else math.nan
        rose = v.rose_before_onset / v.rose if v.rose else math.nan
        by_failure = ", ".join(f"{kind} {count}/{total}"
                               for kind, count, total in v.not_stable_by_failure if total)
        behind = (f"; of those that trained but ended behind, no target, "
                  f"{fraction(v.fell_behind_early, v.fell_behind)}" if v.fell_behind else "")
        lines += [
            f"- {name}, {v.mode}: failed runs judged not stable ≥ {TARGET_NOT_STABLE:.0%}: "
            f"{MET[not share >= TARGET_NOT_STABLE]} ({fraction(v.failed_not_stable, v.failed)}"
            f"{f': {by_failure}' if by_failure else ''}); "
            f"no healthy run judged collapsed: {MET[v.healthy_collapsed > 0]} "
            f"({v.healthy_collapsed}/{v.healthy}); runs that never trained warned within "
            f"{EARLY_FRACTION:.0%} of their steps: "
            f"{MET[not early == 1] if v.never_trained else 'no such run'} "
            f"({fraction(v.never_trained_early, v.never_trained)}{behind}); late "
            f"collapses warned before onset ≥ {TARGET_RECALL:.0%}: "
            f"{MET[not rose >= TARGET_RECALL] if v.rose else 'no such run'} "
            f"({fraction(v.rose_before_onset, v.rose)})."]
    return lines


def reference_alarms_on_healthy(runs: Sequence[ScoredRun]) -> int:
    """Alarms only a reference's loss curve gives (`REFERENCE_ONLY`) on healthy runs."""
    return sum(len(run.reference_alarms) for run in runs if not run.label.collapsed)


def target_lines(name: str, scores: Sequence[Score], runs: Sequence[ScoredRun]) -> list[str]:
    ours = scores[0]
    anchors = scores[-len(anchor_detectors()):]
    with_reference = ours.false_alarms + reference_alarms_on_healthy(runs)
    rate = PER_STEPS * with_reference / ours.healthy_steps if ours.healthy_steps else math.nan
    lines = [(f"- {name}: ≤ {TARGET_FALSE_ALARMS:g} false warning per 10k healthy steps: "
              f"{MET[not ours.false_alarm_rate <= TARGET_FALSE_ALARMS]} "
              f"({ours.false_alarms} in {ours.healthy_steps} steps, "
              f"{ours.false_alarm_rate:.1f} per 10k); with a reference, "
              f"{MET[not rate <= TARGET_FALSE_ALARMS]} ({with_reference}, {rate:.1f} per 10k: "
              f"{reference_alarms_on_healthy(runs)} more from "
              f"{', '.join(f'`{detector}`' for detector in sorted(REFERENCE_ONLY))}).")]
    for anchor in anchors:
        better, worse = compare(ours, anchor)
        leads = common_leads(ours, anchor)
        lead_text = ("" if leads is None else
                     f" Median lead on the {leads[0]} failures both caught before onset: "
                     f"{leads[1]:g} steps against {leads[2]:g}.")
        run_by_run = "; ".join(paired.text(unit) for paired, unit in paired_axes(ours, anchor))
        lines.append(f"- {name}: better than `{anchor.name}` on at least one axis, worse on none: "
                     f"{MET[not (better and not worse)]} (better: {', '.join(better) or 'none'}; "
                     f"worse: {', '.join(worse) or 'none'}). Run by run: {run_by_run}.{lead_text}")
    return lines


def miss_lines(runs: Sequence[ScoredRun]) -> list[str]:
    """Facts behind the failures the verdicts (with reference) called stable."""
    lines = []
    healthy_finals = [run.final_smoothed_loss for run in runs if not run.label.collapsed]
    for mode in MODES:
        missed = [run for run in runs if run.label.collapsed and run.verdicts[mode]["status"] == "stable"]
        if missed:
            lines.append(f"- {mode}: {counted(len(missed), 'failed run', 'failed runs')} "
                         f"judged stable: " + ", ".join(
                f"`{run.name}` ({run.label.kind}, final smoothed loss {run.final_smoothed_loss:.3g})"
                for run in missed[:RUNS_LISTED])
                + (" and more" if len(missed) > RUNS_LISTED else "") + ".")
            if mode == MODES[0]:
                # A failure told only by a reference the mode lacks: a healthy run of the
                # set ended as high, so no threshold on the final loss separates the two.
                hidden = sum(any(final >= run.final_smoothed_loss for final in healthy_finals)
                             for run in missed)
                lines.append(f"  {hidden} of the {len(missed)} ended no higher than one of the "
                             f"set's {len(healthy_finals)} healthy runs (the highest of those ended "
                             f"at {max(healthy_finals, default=math.nan):.3g}): on the final loss "
                             f"alone, no rule without a reference calls such a run failed and "
                             f"that healthy run stable.")
        wrong = [run for run in runs if not run.label.collapsed and run.verdicts[mode]["status"] != "stable"]
        if wrong:
            # Past the runs listed, the count of each verdict says the rest.
            statuses = Counter(run.verdicts[mode]["status"] for run in wrong)
            by_status = (" (" + ", ".join(f"{n} {status}" for status, n in statuses.most_common()) + ")"
                         if len(wrong) > RUNS_LISTED else "")
            lines.append(f"- {mode}: {counted(len(wrong), 'healthy run', 'healthy runs')} "
                         f"judged not stable{by_status}: " + ", ".join(
                f"`{run.name}` ({run.verdicts[mode]['status']} by {run.verdicts[mode]['signal']} at "
                f"step {run.verdicts[mode]['step']})" for run in wrong[:RUNS_LISTED])
                + (" and more" if len(wrong) > RUNS_LISTED else "") + ".")
    healthy = [run.early_smoothed_loss for run in runs if not run.label.collapsed]
    late = [run for run in runs if run.label.kind == "failed to train"
            and not warned_by(run, MODES[1], EARLY_FRACTION * run.steps)]
    never = [run for run in late if run.never_trained]
    if never:
        lines.append(early_miss_line(never, ("run that never trained was",
                                             "runs that never trained were"), healthy)
                     + never_trained_text(never))
    behind = [run for run in late if run.fell_behind]
    if behind:
        lines.append(early_miss_line(behind, ("run that trained but ended behind was",
                                              "runs that trained but ended behind were"), healthy)
                     + fell_behind_text(behind))
    # Late collapses as the table counts them, without a reference: with one, a run that
    # starts slowly (a learning-rate ramp from 0) is also warned as behind its reference's
    # curve, which says nothing of the collapse to come.
    rose = [run for run in runs if run.label.kind == "rose"]
    no_lead = [run for run in rose if run.verdicts[MODES[0]].get("first_warning_step") == run.label.onset]
    if no_lead:
        lines.append(
            f"- {len(no_lead)} of the {counted(len(rose), 'late collapse', 'late collapses')} "
            f"{'was' if len(no_lead) == 1 else 'were'} first warned (without a reference) at "
            f"their onset step itself (counted as before onset, with no lead): " + ", ".join(
                f"`{run.name}` (step {run.label.onset})" for run in no_lead[:RUNS_LISTED])
            + (" and more" if len(no_lead) > RUNS_LISTED else "") + ".")
    after = [run for run in rose if not warned_by(run, MODES[0], run.label.onset)]
    if after:
        lines.append(
            f"- {len(after)} of the {counted(len(rose), 'late collapse', 'late collapses')} "
            f"{'was' if len(after) == 1 else 'were'} not warned by their onset (without a "
            f"reference): "
            + ", ".join(f"`{run.name}` (onset {run.label.onset}, first warning "
                        f"{run.verdicts[MODES[0]].get('first_warning_step') or 'none'})"
                        for run in after[:RUNS_LISTED])
            + (" and more" if len(after) > RUNS_LISTED else "") + ".")
    return lines


def early_miss_line(late: Sequence[ScoredRun], kind: tuple[str, str],
                    healthy_early: Sequence[float]) -> str:
    """The runs labelled failed to train and not warned within EARLY_FRACTION of their steps
    (with reference), with the losses that tell whether a warning was possible by then.
    `kind`: how one run, and several, of them are named; `healthy_early`: every healthy
    run's smoothed loss at that point of its own run."""
    apart = sum(run.early_smoothed_loss >= (1 + ONSET_GAP) * run.reference_early_smoothed_loss
                for run in late)
    return (f"- {counted(len(late), *kind)} not warned within {EARLY_FRACTION:.0%} of their "
            f"steps (with reference). Their smoothed loss there, the healthy model's their label "
            f"compares them with at the same step, and how many of the {len(healthy_early)} "
            f"healthy runs were as high or higher at that point: " + ", ".join(
                f"`{run.name}` ({run.early_smoothed_loss:.3g}; "
                f"{run.reference_early_smoothed_loss:.3g}; "
                f"{sum(value >= run.early_smoothed_loss for value in healthy_early)})"
                for run in late[:RUNS_LISTED]) + (" and more" if len(late) > RUNS_LISTED else "")
            + f". {apart} of the {counted(len(late), 'was', 'were')} {ONSET_GAP:.0%} (the labels' "
              f"gap) or more above that healthy model there.")


def failed_to_train_text(runs: Sequence[ScoredRun]) -> str:
    return (f"{sum(run.never_trained for run in runs)} never trained, "
            f"{sum(run.fell_behind for run in runs)} trained but ended behind")


CONTEXT_FREE = "the context-free loss (what the data's token frequencies alone give)"


def never_trained_text(runs: Sequence[ScoredRun]) -> str:
    """What tells `runs` (never trained) from runs that trained: where their loss stayed."""
    unknown = sum(run.context_free_loss is None for run in runs)
    if unknown:
        return (f" {unknown} of them trained on data whose context-free loss is unknown, so "
                f"whether they trained at all is unknown too.")
    return f" None of them got {ONSET_GAP:.0%} below {CONTEXT_FREE}: they never trained."


def fell_behind_text(runs: Sequence[ScoredRun]) -> str:
    """How far `runs` (trained, ended behind) got below their data's context-free loss."""
    ratios = [run.lowest_smoothed_loss / run.context_free_loss for run in runs]
    low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return (f" At their lowest they were {low if low == high else f'{low}–{high}'} of "
            f"{CONTEXT_FREE}: they trained, less far than that healthy model.")


def alarm_text(alarm: dict[str, Any] | None) -> str:
    return "–" if alarm is None else f"{alarm['step']} ({alarm['detector']})"


def verdict_text(judged: Mapping[str, Any]) -> str:
    status = judged["status"]
    if status == "stable":
        return "stable"
    mechanism = f" ({judged['mechanism']})" if judged.get("mechanism") else ""
    return f"{status}{mechanism} @{judged['step']}"


def run_rows(runs: Sequence[ScoredRun]) -> list[list[Any]]:
    anchors = [detector.name for detector in anchor_detectors()]
    return [[run.name, run.expected, run.label.kind,
             "–" if run.label.onset is None else run.label.onset,
             f"{run.final_smoothed_loss:.3g}", verdict_text(run.verdicts[MODES[0]]),
             verdict_text(run.verdicts[MODES[1]]), alarm_text(first_alarm(run, set(DETECTORS))),
             *(alarm_text(first_alarm(run, {name})) for name in anchors)] for run in runs]


def false_alarm_rows(runs: Sequence[ScoredRun]) -> list[list[Any]]:
    rows = []
    for run in runs:
        if run.label.collapsed:
            continue
        alarms = [alarm for alarm in run.alarms if alarm["detector"] in DETECTORS]
        for alarm in run.reference_alarms:
            alarms.append({**alarm, "detector": f"{alarm['detector']} (with reference)"})
        counts = Counter(alarm["detector"] for alarm in alarms)
        for detector, count in sorted(counts.items()):
            first = next(a for a in alarms if a["detector"] == detector)
            rows.append([run.name, detector, count, first["step"],
                         first["message"].replace("|", "\\|")])
    return rows


def setting_rows(runs: Sequence[ScoredRun]) -> list[list[Any]]:
    rows = []
    for setting in SETTINGS:
        labels = Counter(run.label.kind for run in runs if run.group == setting.name)
        overrides = ", ".join(f"{k}={v}" for k, v in setting.model_overrides) or "–"
        lr = f"0 → {setting.lr:g} (ramp)" if setting.lr_ramp else f"{setting.lr:g}"
        rows.append([setting.name, setting.arch, setting.n_loops, lr,
                     "none" if setting.grad_clip is None else f"{setting.grad_clip:g}",
                     overrides, setting.expected,
                     ", ".join(f"{n} {kind}" for kind, n in sorted(labels.items()))])
    return rows


def study_group_rows(runs: Sequence[ScoredRun]) -> list[list[Any]]:
    """Per architecture: runs, failures by label, verdicts with reference."""
    rows = []
    for group in dict.fromkeys(run.group for run in runs):
        mine = [run for run in runs if run.group == group]
        labels = Counter(run.label.kind for run in mine)
        verdicts = Counter(verdict_text({**run.verdicts[MODES[1]], "step": None}).split(" @")[0]
                           for run in mine)
        rows.append([group, len(mine), ", ".join(f"{n} {k}" for k, n in labels.most_common()),
                     ", ".join(f"{n} {k}" for k, n in verdicts.most_common())])
    return rows


def doc_paragraph(prefix: str) -> str:
    """The paragraph of this module's docstring that starts with `prefix`."""
    return next(p for p in __doc__.split("\n\n") if p.startswith(prefix))


STDLIB_VARIABLE = "$STDLIB"
STDLIB_SETTER = """STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"""


def shared_path(path: str) -> str:
    """`path` as a reader elsewhere can use it: relative to the working directory, or under
    `$STDLIB` for Python's standard library, whose place differs from machine to machine."""
    resolved = Path(path).resolve()
    for root, shown in ((Path.cwd(), None), (Path(sysconfig.get_path("stdlib")), STDLIB_VARIABLE)):
        if resolved.is_relative_to(root.resolve()):
            relative = resolved.relative_to(root.resolve()).as_posix()
            return relative if shown is None else f"{shown}/{relative}"
    return path


def shared_command(argv: Sequence[str]) -> str:
    """The invocation as a shell line another machine can run: data paths made shareable, the
    standard library's place set first when a path needs it."""
    words = [shared_path(word) if Path(word).is_file() else word for word in argv]
    # Double quotes: the shell expands $STDLIB in them, and keeps a path with spaces whole.
    line = " ".join(f'"{word}"' if word.startswith(STDLIB_VARIABLE) else shlex.quote(word)
                    for word in words)
    return f"{STDLIB_SETTER}; {line}" if STDLIB_VARIABLE in line else line


def recipe_text(train: Mapping[str, Any]) -> str:
    """The optimizer, batch and schedule a run trained with, from its stored config."""
    schedule = train["schedule"]
    if schedule == "cosine":
        schedule += f" to {train['min_lr_ratio']:g}× the peak"
    if train.get("warmup_steps"):
        schedule += f" after a {train['warmup_steps']}-step linear warm-up"
    decay = f", weight decay {train['weight_decay']:g}" if train.get("weight_decay") else ""
    return f"{train['optimizer']}{decay}, batch {train['batch_size']}, schedule {schedule}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def model_text(model: Mapping[str, Any]) -> str:
    """The model a corpus trained, from its stored config: its size and the choices a
    `--model` override may change besides it."""
    return ", ".join((
        f"d_model {model['d_model']}", plural(model["n_heads"], "head"),
        plural(model["n_layers"], "layer"), f"seq_len {model['seq_len']}",
        f"an MLP {model['mlp_ratio']:g}× the width",
        "QK-norm" if model["qk_norm"] else "no QK-norm",
        "output projections zero-initialised" if model["zero_init_out"]
        else "output projections initialised as GPT-2's",
        "the loss on the last loop" if model["loss_on"] == "last" else "the loss on every loop"))


def records_text(log_every: int) -> str:
    return "every step logged" if log_every == 1 else f"a record every {log_every} steps"


def data_text(config: Mapping[str, Any]) -> str:
    """What a run trained on, from its stored config."""
    data = config["data"]
    if "task" in data:
        return f"the synthetic task `{data['name']}`"
    files = [shared_path(path) for path in data["source"].split(", ")]
    source = f"`{files[0]}` to `{files[-1]}`, {len(files)} files" if len(files) > 3 else f"`{', '.join(files)}`"
    text = f"text {source} ({data['n_bytes']:,} bytes, sha256 {data['sha256'][:12]}…)"
    if "tokenizer" in data:  # a tokenizer's ids, not bytes
        text += f" as {data['n_tokens']:,} ids of a {data['tokenizer']} of {data['vocab_size']:,} tokens"
    return text


def study_section(path: Path, runs: Sequence[ScoredRun], healthy: Mapping[int, float],
                  scores: Sequence[Score]) -> str:
    config = json.loads((path / runs[0].name / "config.json").read_text(encoding="utf-8"))
    model, log_every = config["model"], config["probes"]["log_every"]
    kinds = Counter(run.label.kind for run in runs)
    misses = miss_lines(runs)
    failed = [run for run in runs if run.label.collapsed]
    if failed and all(run.label.onset == run.first_step for run in failed):
        misses.insert(0, "- Every failed run's onset is its first record: it never came within "
                         "10 % of the healthy loss, so no detector can warn before onset here; "
                         "compare the detectors by the end of the run.")
    arch, n_loops, lr = STUDY_REFERENCE
    return f"""## The study `{study_name(path)}`

{len(runs)} runs of `{path}` replayed from their records: {data_text(config)}, d_model
{model["d_model"]}, {model["n_layers"]} layers per loop, {config["train"]["steps"]} steps,
{records_text(log_every)}. The healthy
one-loop model (`{arch}`, K={n_loops}, lr {lr:g}) ends at a smoothed loss of
{", ".join(f"{loss:.3f} (seed {seed})" for seed, loss in healthy.items())};
{sum(r.label.collapsed for r in runs)} runs are labelled failed
({kinds['rose']} rose, {kinds['failed to train']} failed to train: {failed_to_train_text(runs)}).

{markdown_table(("architecture", "runs", "labels (from the loss)", "verdicts (with reference)"),
                study_group_rows(runs))}

### Detectors on `{study_name(path)}`

{markdown_table(COLUMNS, table_rows(scores))}

### Where the verdicts and the labels disagree

{chr(10).join(misses) if misses else "Nowhere."}
"""


def trained_by_command(cache: Path) -> str | None:
    """The command that last trained runs into `cache`, as its manifest keeps it."""
    try:
        return json.loads((cache / CORPUS_FILE).read_text(encoding="utf-8"))["trained_by"]
    except FileNotFoundError:
        return None


def write_report(out: Path, cache: Path, runs: Sequence[ScoredRun], scores: Sequence[Score],
                 seeds: Sequence[int], steps: int, command: str, train_seconds: float | None,
                 total_seconds: float, run_config: Mapping[str, Any],
                 studies: Sequence[tuple[Path, list[ScoredRun], Mapping[int, float]]]) -> None:
    """`run_config`: one run's stored config, for the settings all runs share."""
    model, train = run_config["model"], run_config["train"]
    collapses = [run for run in runs if run.label.collapsed]
    kinds = Counter(run.label.kind for run in runs)
    healthy_steps = sum(run.steps for run in runs if not run.label.collapsed)
    trained_by = trained_by_command(cache)
    trained = (f"the corpus was scored from its records in `{shared_path(str(cache))}/` "
               f"(no training in this invocation"
               + ("" if trained_by is None else f"; trained by `{trained_by}`") + ")"
               if train_seconds is None else f"training the corpus took {train_seconds:.0f} s")
    corpus_verdicts = [score_verdicts(runs, mode) for mode in MODES]
    verdict_table_rows = verdict_rows("corpus", corpus_verdicts)
    targets = [*verdict_target_lines("corpus", corpus_verdicts), *target_lines("corpus", scores, runs)]
    study_texts = []
    for path, study_runs, healthy in studies:
        name, study_scores = study_name(path), score_all(study_runs)
        study_verdicts = [score_verdicts(study_runs, mode) for mode in MODES]
        verdict_table_rows += verdict_rows(name, study_verdicts)
        targets += [*verdict_target_lines(name, study_verdicts),
                    *target_lines(name, study_scores, study_runs)]
        study_texts.append(study_section(path, study_runs, healthy, study_scores))
    misses = miss_lines(runs)
    false_alarms = false_alarm_rows(runs)
    text = f"""# Detection quality of loopdiag's collapse detectors and verdicts

Produced by `{command}`; {trained}, the whole invocation {total_seconds:.0f} s.

## Labels (written before scoring)

{doc_paragraph("Labels come from")}

## Held-out runs

{doc_paragraph("Held-out seeds")}

## Verdicts

{doc_paragraph("Verdicts (the end-of-run")}

{markdown_table(VERDICT_COLUMNS, verdict_table_rows)}

## Targets

{chr(10).join(targets)}

## The corpus

{len(runs)} runs: {len(SETTINGS)} settings × seeds {', '.join(map(str, seeds))}, {model_text(model)},
{steps} steps each, {recipe_text(train)} (the ramp settings: the learning rate rising linearly from 0
over the whole run), {records_text(run_config["probes"]["log_every"])}, {data_text(run_config)}. Each run sees the same
batches as every other run of its seed.
Labelled from the loss: {len(collapses)} failed runs and {len(runs) - len(collapses)}
healthy runs ({healthy_steps} healthy steps): {kinds['rose']} rose, {kinds['failed to train']}
failed to train ({failed_to_train_text(runs)}).

{markdown_table(("setting", "arch", "K", "lr", "grad clip", "model overrides",
                 "chosen as", "labels (from the loss)"), setting_rows(runs))}

### Detectors on the corpus

{doc_paragraph("Per detector set")}

{markdown_table(COLUMNS, table_rows(scores))}

Rows below the first are each detector alone: the defaults, then the anchors (OLMo-core's
6σ-over-128, the common 3σ-over-30, Megatron-LM's 10× first-100 maximum, llm-foundry's
persistent high loss). A false-alarm rate is events per 10k healthy steps (event count in
brackets); the anchors fire on every record that meets their rule, loopdiag's detectors
once per episode (cooldown). Information events (`dead_loops`, `vanishing_gradient`
alone) are not alarms.

### Where the verdicts and the labels disagree

{chr(10).join(misses) if misses else "Nowhere."}

### Every run

Verdicts in both modes; first alarm (step and detector) of loopdiag's defaults together and
of each anchor.

{markdown_table(("run", "chosen as", "label", "onset", "final smoothed loss",
                 "verdict, no reference", "verdict, with reference", "loopdiag",
                 *(d.name for d in anchor_detectors())), run_rows(runs))}

### Alarms on healthy runs

{markdown_table(("run", "detector", "events", "first step", "first message"),
                false_alarms) if false_alarms else "None."}

{chr(10).join(study_texts) if studies else "No study was scored."}"""
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text, encoding="utf-8")
    write_csv(out / "table.csv", scores)


def key_value_overrides(pairs: Sequence[str]) -> list[tuple[str, Any]]:
    """`KEY=VALUE` pairs, each value a Python literal (64, 1e-2, None) or else a string."""
    overrides = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            overrides.append((key, ast.literal_eval(value)))
        except (ValueError, SyntaxError):
            overrides.append((key, value))
    return overrides


def parse_args(argv: Sequence[str] | None = None, *, read_data: bool = True
               ) -> tuple[argparse.Namespace, list[int], CorpusSpec | None]:
    """(arguments, seeds, corpus spec: None with `--rescore`, which trains nothing); exits
    with a usage error on bad input, before any training. `read_data=False` reads a command
    for its seeds and cache alone, as a committed report's: its text files need not exist."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--data", nargs="+", default=[], metavar="FILE",
                        help="train the corpus on these text files (default: the embedded corpus)")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides of the tiny preset, e.g. d_model=64 n_heads=4 seq_len=64")
    parser.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE",
                        help="the training recipe, overrides of TrainConfig, e.g. schedule=cosine "
                             "warmup_steps=40 batch_size=8 (not the settings' own: "
                             f"{', '.join(SETTING_TRAIN_KEYS)})")
    parser.add_argument("--log-every", type=int, default=None, metavar="N",
                        help="record the probes (and the loss) every N steps (default 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None,
                        help="the corpus's run folders (default: <out>/runs, committed with the "
                             "report as records without checkpoints)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished run folders in the cache instead of retraining")
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished runs in the cache as they were recorded: no "
                             "training, no text read")
    parser.add_argument("--study", type=Path, nargs="*", default=list(STUDIES),
                        help="suites' run stores to replay and score too (each skipped if absent; "
                             "none given: no study)")
    parser.add_argument("--out", type=Path, default=Path("reports/detection"))
    args = parser.parse_args(argv)
    args.cache = args.cache or args.out / "runs"
    if min(args.seeds) < HELD_OUT_FROM_SEED:
        parser.error(f"only seeds >= {HELD_OUT_FROM_SEED} are scored: seed 0 set the thresholds "
                     f"and seeds 1-10 scored earlier versions of the detectors")
    seeds = sorted(set(args.seeds))
    if args.rescore:
        training = [flag for flag, given in (("--steps", args.steps is not None),
                                             ("--data", args.data), ("--model", args.model),
                                             ("--train", args.train), ("--reuse", args.reuse),
                                             ("--log-every", args.log_every is not None))
                    if given]
        if training:
            parser.error(f"--rescore scores the runs as they were recorded, without "
                         f"training: drop {', '.join(training)}")
        return args, seeds, None
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    args.log_every = 1 if args.log_every is None else args.log_every
    if args.log_every < 1:
        parser.error(f"--log-every must be >= 1, got {args.log_every}")
    try:
        model = tuple(key_value_overrides(args.model))
        spec = CorpusSpec(args.steps, tuple(args.data), model)
        for setting in SETTINGS:
            spec.model_config(setting)
    except (TypeError, ValueError) as err:
        parser.error(f"--model: {err}")
    try:
        recipe = tuple(key_value_overrides(args.train))
        owned = [key for key, _ in recipe if key in SETTING_TRAIN_KEYS]
        if owned:
            raise ValueError(f"{', '.join(owned)} belong to each setting, not to the recipe")
        spec = CorpusSpec(args.steps, tuple(args.data), model, recipe, args.log_every)
        from loopdiag.train import TrainConfig

        for setting in SETTINGS:
            TrainConfig(**spec.train_config(setting))
    except (TypeError, ValueError) as err:
        parser.error(f"--train: {err}")
    missing = [path for path in args.data if read_data and not Path(path).is_file()]
    if missing:
        parser.error(f"--data: no such file: {', '.join(missing)}")
    return args, seeds, spec


def main() -> None:
    args, seeds, spec = parse_args()
    command = shared_command(["python", "benchmarks/detection.py", *sys.argv[1:]])

    start = time.perf_counter()
    if spec is None:
        try:
            recorded = recorded_corpus(seeds, args.cache)
        except ValueError as err:
            sys.exit(f"error: {err}")
        train_seconds, steps = None, recorded["train"]["steps"]
        context_free = context_free_loss(recorded)
    else:
        from loopdiag.data import load_corpus

        corpus = load_corpus(spec.data or None)
        args.cache.mkdir(parents=True, exist_ok=True)
        train_seconds = build_corpus(seeds, spec, corpus.sha256, args.cache, args.reuse, args.workers)
        if train_seconds is not None:
            (args.cache / CORPUS_FILE).write_text(json.dumps({"trained_by": command}, indent=1) + "\n",
                                                  encoding="utf-8")
        steps, context_free = spec.steps, corpus.context_free_loss
    runs = score_corpus(seeds, args.cache, context_free)
    scores = score_all(runs)
    studies = [(path, *score_study(path)) for path in args.study if (path / SUITE_FILE).is_file()]
    total_seconds = time.perf_counter() - start

    print()
    print(text_table(VERDICT_COLUMNS, verdict_rows("corpus", [score_verdicts(runs, m) for m in MODES])
                     + [row for path, study_runs, _ in studies for row in verdict_rows(
                         study_name(path), [score_verdicts(study_runs, m) for m in MODES])]))
    print()
    print(text_table(COLUMNS, table_rows(scores)))
    print()
    for line in [*target_lines("corpus", scores, runs), *miss_lines(runs)]:
        print(line.replace("**", ""))
    if train_seconds is not None:
        print(f"\ncorpus trained in {train_seconds:.0f} s; total {total_seconds:.0f} s")
    reference_config = args.cache / run_name(SETTINGS[0], seeds[0]) / "config.json"
    write_report(args.out, args.cache, runs, scores, seeds, steps, command, train_seconds,
                 total_seconds, json.loads(reference_config.read_text(encoding="utf-8")), studies)
    print(f"wrote {args.out / 'README.md'} and {args.out / 'table.csv'}")


if __name__ == "__main__":
    main()
