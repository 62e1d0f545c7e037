"""Weights & Biases logging: one W&B run per training run, grouped by suite, plus a report
run per suite.

Offline is the default: a run is written to `<dir>/wandb/offline-run-<time>-<id>/` with no
account and no network, and `wandb sync <that folder>` uploads it later. Every series is
logged under the keys the frames use (`resid_norm/loop_03`), against the training step.

W&B is never on the training's critical path: any exception from it is reported in one
line and turns the logger into a no-op. `wandb` is imported inside functions, so importing
this module (or `loopdiag`) stays light.

Online, a server that is unreachable, slow or failing is learned once per W&B folder
(`dir`, the suite folder): the first run whose `wandb.init` fails or takes longer than
`ONLINE_WAIT_S`, or whose W&B calls fail mid-run (an upload at `finish` included), writes
`OUTAGE_FILE` into `<dir>/wandb/` and logs one line; every later run of any process using
that folder sees the file and logs offline beside it, for `wandb sync` to upload later.
`forget_outage` removes the file (a new suite invocation tries online again).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopdiag.detect import SEVERITIES, Event

if TYPE_CHECKING:
    import pandas as pd

MODES = ("offline", "online")
STEP_KEY = "step"
# events/<detector> charts: 1 info, 2 warn, 3 critical (0 would read as "nothing fired")
EVENT_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES, start=1)}
ALERT_LEVEL = {"info": "INFO", "warn": "WARN", "critical": "ERROR"}
ALERT_TITLE_MAX = 63  # W&B wants titles under 64 characters
EVENT_COLUMNS = ["step", "detector", "severity", "message"]
# Seconds an online run waits on the W&B server, to start (`wandb.init`) and to upload what
# is left at `finish`; longer counts as unreachable. WANDB_INIT_TIMEOUT overrides the first.
ONLINE_WAIT_S = 10.0
OUTAGE_FILE = "loopdiag-unreachable.json"  # in <dir>/wandb/; see the module docstring

log = logging.getLogger(__name__)  # one line per failure; unconfigured, Python prints it on stderr
_outages_without_dir: set[str] = set()  # where there is no folder to mark: once per process


class WandbRun:
    """One W&B run for one training run: records as history, detector events as chart
    points and alerts, the verdict as summary.

    Use it as a `Monitor` sink (`emit`) and call `log_record` for every record and
    `finish(summary)` at the end. The run is named `run_id`, grouped by `group` (the suite),
    and tagged with the architecture and `K=<loops>` when `config` has a `cell`. W&B picks
    the W&B id (`wandb_id`), so a run id reused by another suite never resumes an old run;
    `resume_id`, the `wandb_id` of an earlier process of the same training run, goes on in
    that W&B run instead (offline, a second folder with the same id, which `wandb sync`
    uploads after the first).

    History: `log_record` logs the flat record at `step=record["step"]` and keeps `step` as
    a series; every metric is defined against it (`define_metric("*", step_metric="step")`),
    so per-loop curves, sparse costly-tier stats, eval losses and event marks share one x
    axis even where a key is missing from some rows.

    Alerts go through `run.alert`, at most one per detector per `alert_interval_s` (also
    W&B's `wait_duration`), except that a more severe event than the last alerted one (a
    critical after a warn) is always sent. In offline mode alerts are stored in the run
    file and delivered only when it is synced, so local sinks (console, events.jsonl) must
    never depend on W&B.

    Failure isolation: an exception from W&B in any call (init, log, alert, finish) turns
    every later call into a no-op. Online, it is an outage (see the module docstring): one
    line per W&B folder, and later runs log offline; an online `wandb.init` that fails is
    retried offline at once, so the run keeps its W&B data. Offline, it is logged as one
    line naming the run.
    """

    def __init__(
        self,
        run_id: str,
        config: Mapping[str, Any],
        *,
        project: str = "loopdiag",
        group: str | None = None,
        tags: Iterable[str] = (),
        mode: str = "offline",
        dir: str | Path | None = None,
        alert_on: str = "warn",
        alert_interval_s: float = 300.0,
        resume_id: str | None = None,
    ):
        _check_mode(mode)
        if alert_on not in SEVERITIES:
            raise ValueError(f"alert_on must be one of {', '.join(SEVERITIES)}, got {alert_on!r}")
        self.run_id = run_id
        self.mode, self.dir = mode, dir
        self.alert_rank = EVENT_RANK[alert_on]
        self.alert_interval_s = alert_interval_s
        self.run_dir: Path | None = None  # what `wandb sync` takes
        self.wandb_id: str | None = None  # W&B's id of the run, once started
        self.events: list[list[Any]] = []
        self._last_step = 0
        self._last_alert: dict[str, tuple[float, int]] = {}  # detector -> (monotonic time, rank)
        self._run: Any = None
        cell = config.get("cell") or {}
        run_tags = [*tags, *([cell["arch"], f"K={cell['n_loops']}"] if cell else [])]
        resumed = {} if resume_id is None else {"id": resume_id, "resume": "allow"}
        try:
            self._run = _start_run(project=project, mode=mode, dir=dir, name=run_id, group=group,
                                  job_type="train", tags=list(dict.fromkeys(run_tags)), config=dict(config),
                                  **resumed)
            self.wandb_id = self._run.id
            self._run.define_metric(STEP_KEY)
            self._run.define_metric("*", step_metric=STEP_KEY)
            self.run_dir = Path(self._run.settings.sync_dir)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self._disable("init", error)

    @property
    def active(self) -> bool:
        """Whether calls still reach W&B (False after `finish` or a failure)."""
        return self._run is not None

    @property
    def wandb_run(self) -> Any:
        """The underlying `wandb` run while active, for logging anything else (calls made on
        it directly are not isolated); None otherwise."""
        return self._run

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Log one record at its step: per-loop lists as `<name>/loop_01`, ..., scalars as is."""
        # the probes package imports torch: loaded here, where training already has it
        from loopdiag.probes.records import flatten_record

        step = int(record["step"])
        row = flatten_record(dict(record))
        self._call("log", lambda run: run.log(row, step=step))
        self._last_step = max(self._last_step, step)

    def emit(self, event: Event) -> None:
        """Alert sink: the event as a point on `events/<detector>` (its severity rank), a row of
        the events table written at `finish`, and a rate-limited W&B alert."""
        self.events.append([event.step, event.detector, event.severity, event.message])
        rank = EVENT_RANK[event.severity]
        step = max(event.step, self._last_step)  # W&B silently drops a step that goes back
        self._call("log", lambda run: run.log({f"events/{event.detector}": rank, STEP_KEY: step}, step=step))
        self._last_step = step
        if rank >= self.alert_rank and self._alert_due(event.detector, rank):
            self._call("alert", lambda run: self._alert(run, event))

    def finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write the verdict into the run summary as `verdict/<key>` (`verdict/status`,
        `verdict/step`, `verdict/signal`, ...; prefixed because `step` is already the step
        series' summary) and the events table, then close the run. Later calls do nothing."""

        def close(run: Any) -> None:
            from wandb import Table

            try:
                if self.events:
                    run.log({"events": Table(columns=EVENT_COLUMNS, data=self.events)}, step=self._last_step)
                run.summary.update({f"verdict/{key}": value for key, value in (summary or {}).items()})
            finally:
                run.finish()  # a run left open would hold the W&B backend until the process exits

        self._call("finish", close)
        self._run = None

    def _alert(self, run: Any, event: Event) -> None:
        from wandb import AlertLevel

        # the severity is in the title because W&B's wait_duration holds back repeats of a
        # title: an escalation must not look like a repeat
        run.alert(title=f"{event.severity.upper()} {event.detector} in {self.run_id}"[:ALERT_TITLE_MAX],
                  text=f"{self.run_id}, step {event.step}: {event.message}",
                  level=AlertLevel(ALERT_LEVEL[event.severity]), wait_duration=self.alert_interval_s)

    def _alert_due(self, detector: str, rank: int) -> bool:
        now = time.monotonic()
        last = self._last_alert.get(detector)
        if last is not None and now - last[0] < self.alert_interval_s and rank <= last[1]:
            return False
        self._last_alert[detector] = (now, rank)
        return True

    def _call(self, action: str, call: Callable[[Any], Any]) -> None:
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self._disable(action, error)

    def _disable(self, action: str, error: Exception) -> None:
        online = self._run is not None and self._run.settings.mode == "online"
        self._run = None
        if online:
            note_outage(self.dir, f"{self.run_id}, {action}: {_first_line(error)}; what it logged "
                                  f"is in {self.run_dir}")
        else:
            log.warning(f"W&B logging for run {self.run_id} failed in {action} and is off for the "
                        f"rest of the run: {_first_line(error)}")


def log_suite(
    suite_name: str,
    table: pd.DataFrame,
    figures: Mapping[str, str | Path],
    *,
    project: str = "loopdiag",
    mode: str = "offline",
    dir: str | Path | None = None,
) -> Path | None:
    """Log a suite's stability table (`stability`, a `wandb.Table`) and report figures
    (`figures/<name>`, `wandb.Image`s) as a separate run (`job_type="suite-report"`, named
    `<suite>-report`, in the suite's group). Returns the run folder for `wandb sync`, or
    None when W&B failed (logged: a report never fails for W&B)."""
    _check_mode(mode)
    try:
        import wandb

        run = _start_run(project=project, mode=mode, dir=dir, name=f"{suite_name}-report", group=suite_name,
                        job_type="suite-report", config={"suite": suite_name})
        try:
            run.log({"stability": wandb.Table(dataframe=table),
                     **{f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()}})
        finally:
            run.finish()
        return Path(run.settings.sync_dir)
    except Exception as error:  # noqa: BLE001 - the report is already on disk without W&B
        log.warning(f"W&B report for suite {suite_name} failed: {_first_line(error)}")
        return None


def _start_run(*, project: str, mode: str, dir: str | Path | None, **init: Any) -> Any:
    """`wandb.init` for one of several runs in this process (`reinit="create_new"`); online,
    within `ONLINE_WAIT_S`, and offline instead once the folder has learned of an outage."""
    import wandb

    if dir is not None:
        # wandb quietly falls back to a temp folder when it cannot use `dir`: the run
        # would then be missing where `wandb sync` is pointed, so fail here instead
        Path(dir).mkdir(parents=True, exist_ok=True)
    if mode == "online" and outage(dir) is None:
        # read here: wandb reads its environment once per process, at its first run
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", ONLINE_WAIT_S))
        limits = wandb.Settings(init_timeout=init_timeout, finish_timeout=ONLINE_WAIT_S,
                                finish_timeout_raises=True)
        try:
            return wandb.init(project=project, mode="online", dir=dir, reinit="create_new",
                              settings=limits, **init)
        except Exception as error:  # noqa: BLE001 - unreachable, slow, refused: log offline instead
            note_outage(dir, f"{init.get('name')}, init: {_first_line(error)}")
    return wandb.init(project=project, mode="offline", dir=dir, reinit="create_new", **init)


def outage(dir: str | Path | None) -> str | None:
    """Why online W&B was given up for runs in `dir`, or None while it has not been."""
    if dir is not None:
        try:
            return json.loads((Path(dir) / "wandb" / OUTAGE_FILE).read_text())["reason"]
        except (OSError, ValueError, KeyError):
            pass
    return next(iter(_outages_without_dir), None)


def note_outage(dir: str | Path | None, reason: str) -> None:
    """Record that online W&B failed for runs in `dir`; the first to record it logs the line."""
    if dir is None:
        first = not _outages_without_dir
        _outages_without_dir.add(reason)
    else:
        folder = Path(dir) / "wandb"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # "x": of several processes failing at once, exactly one creates the file
            with (folder / OUTAGE_FILE).open("x", encoding="utf-8") as handle:
                json.dump({"reason": reason, "at": time.time()}, handle)
            first = True
        except FileExistsError:
            first = False
        except OSError:  # no folder to mark: this process at least stops trying
            first = not _outages_without_dir
            _outages_without_dir.add(reason)
    if first:
        where = Path(dir or ".") / "wandb"
        log.warning(f"W&B unreachable ({reason}); runs log offline from now on: `wandb sync "
                    f"{where}/offline-run-*` uploads them once the server is back")


def forget_outage(dir: str | Path) -> None:
    """Let the next online run in `dir` try the server again."""
    (Path(dir) / "wandb" / OUTAGE_FILE).unlink(missing_ok=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
