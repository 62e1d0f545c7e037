"""Probe suites: the declarative experiment specs (`probes/*.toml`) that `loopdiag run` runs.

    name = "default"                  # the report goes to reports/<name>/
    description = "one line for the report"
    archs = ["standard", "looped", "flt"]
    loops = [1, 4, 12]
    lrs = [3e-3]                      # one run per (arch, loops, lr, seed)
    seeds = 1                         # a count (seeds 0..n-1) or a list of seeds
    steps = 150
    log_every = 1                     # probe statistics every n steps
    stop_on_collapse = false          # stop a run when a detector goes critical

    [model]      preset = "default", then any ModelConfig field (d_model = 96, ...)
    [train]      any TrainConfig field but steps, lr, seed, n_loops (the grid sets those);
                 false turns off a setting that takes None (grad_clip = false)
    [data]       files = ["my.txt", "texts/*.md"] (relative to the suite file; a glob takes
                 the files it matches, in name order), or task = "addition" /
                 "pointer-chasing" with the task's own fields; default: the embedded corpus
    [detectors]  thresholds by detector: [detectors.loss_spike] z = 8
    [eval]       loops = [1, 2, 4, 8, 12]: test-time loop scaling of every trained run

Every key is checked when the file is read; a bad one is reported as
`<file>: <key>: <reason>`.

A suite is named by its file's stem (`loopdiag run flt-stability`): names are looked up in
`./probes/` (your own suites), then among the suites shipped in the package
(`loopdiag/suites/` in an installed wheel, built from the repository's `probes/`; in a
checkout, `probes/` itself).
"""

from __future__ import annotations

import copy
import math
import tomllib
import types
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from loopdiag.data import TASKS, VOCAB_SIZE, DataError, SyntheticTask, TokenCorpus, expand_globs, load_corpus
from loopdiag.detect import default_detectors
from loopdiag.detect.base import is_int
from loopdiag.models import ARCHITECTURES, ModelConfig, preset
from loopdiag.run.runner import RunSpec
from loopdiag.store.suite_folder import WITH_OPTIONS
from loopdiag.train import TrainConfig
from loopdiag.train.config import OPTIMIZERS, PARALLEL, PRECISIONS, SCHEDULES

TOP_LEVEL_KEYS = ("name", "description", "archs", "loops", "lrs", "seeds", "steps", "log_every",
                  "stop_on_collapse", "model", "train", "data", "detectors", "eval")
GRID_OWNED_TRAIN_KEYS = ("steps", "lr", "seed", "n_loops")
EVAL_KEYS = ("loops", "examples")


class SuiteError(ValueError):
    """A suite file or option that cannot be run; the message names the file, key and why."""


@dataclass(frozen=True)
class DataSpec:
    files: tuple[str, ...] = ()  # empty: the embedded corpus
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    # Where the files were named (`<suite>: data.files` or `--data`), for a file that cannot be read.
    origin: str = field(default="", compare=False)

    def load(self) -> TokenCorpus | SyntheticTask:
        if self.task is not None:
            return TASKS[self.task](**self.task_options)
        try:
            return load_corpus(list(self.files) or None)
        except DataError as error:
            raise DataError(f"{self.origin}: {error}" if self.origin else str(error)) from None

    def describe(self) -> str:
        if self.task is not None:
            return f"task {self.task}" + "".join(f", {k}={v}" for k, v in self.task_options.items())
        if len(self.files) > 3:  # a glob's dozens of files: the banner stays one line
            return f"{len(self.files)} files, {self.files[0]} to {self.files[-1]}"
        return ", ".join(self.files) if self.files else "embedded CPython docs"

    def to_dict(self) -> dict[str, Any]:
        if self.task is not None:
            return {"task": self.task, **self.task_options}
        return {"files": list(self.files)} if self.files else {"corpus": "embedded"}


@dataclass(frozen=True)
class ProbeSuite:
    name: str
    archs: tuple[str, ...]
    loops: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    model: ModelConfig
    train: TrainConfig
    data: DataSpec = DataSpec()
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_every: int = 1
    stop_on_collapse: bool = False
    eval_loops: tuple[int, ...] = ()
    eval_examples: int = 256
    description: str = ""
    source: str | None = None  # the file it was read from
    command: str | None = None  # the command line that ran it, when one did
    # What the file said, for command-line options to be applied and checked the same way.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    base_dir: Path = Path(".")

    def cells(self) -> list[RunSpec]:
        """Every (arch, loops, lr, seed) run, the lr left out of run ids when there is one."""
        swept = len(self.lrs) > 1
        return [RunSpec(arch, k, seed, lr if swept else None)
                for arch in self.archs for k in self.loops for lr in self.lrs for seed in self.seeds]

    def with_(self, **changes: Any) -> ProbeSuite:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved suite, as `suite.json` records it."""
        return {
            "name": self.name, "description": self.description, "source": self.source,
            "command": self.command,
            "archs": list(self.archs), "loops": list(self.loops), "lrs": list(self.lrs),
            "seeds": list(self.seeds), "steps": self.train.steps, "log_every": self.log_every,
            "stop_on_collapse": self.stop_on_collapse, "model": self.model.to_dict(),
            "train": asdict(self.train), "data": self.data.to_dict(),
            "detectors": self.thresholds,
            "eval": {"loops": list(self.eval_loops), "examples": self.eval_examples},
        }


def load_probe_suite(path: str | Path) -> ProbeSuite:
    """Read and validate a suite file; raises `SuiteError` naming the file and key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such suite file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SuiteError(f"{path}: cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SuiteError(f"{path}: not valid TOML: {error}") from None
    return parse_probe_suite(raw, source=str(path), base_dir=path.parent, default_name=path.stem)


def suite_folders() -> list[Path]:
    """Where suite names are looked up, first match first: ./probes, then the shipped suites."""
    shipped = resources.files("loopdiag") / "suites"  # in a wheel: probes/*.toml, copied by setup.py
    checkout = Path(__file__).resolve().parents[2] / "probes"  # editable install or source tree
    folders = [Path("probes"), Path(str(shipped)) if shipped.is_dir() else checkout]
    return list({folder.resolve(): folder for folder in folders if folder.is_dir()}.values())


def find_suite(name: str | None) -> Path:
    """A suite file: `name` itself when it is a .toml path or an existing file, else
    `<name>.toml` in `suite_folders()`; `default` when None."""
    if name is not None and (name.endswith(".toml") or Path(name).is_file()):
        return Path(name)
    name = name or "default"
    for folder in suite_folders():
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    known = ", ".join(sorted(available_suites()))
    raise SuiteError(f"no suite named {name!r}: give a .toml path, or one of {known}")


def available_suites() -> dict[str, tuple[Path, str]]:
    """Every suite name `find_suite` resolves: name -> (file, its one-line description)."""
    found: dict[str, tuple[Path, str]] = {}
    for folder in suite_folders():
        for path in sorted(folder.glob("*.toml")):
            if path.stem not in found:
                try:
                    description = tomllib.loads(path.read_text(encoding="utf-8")).get("description", "")
                except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
                    description = f"(unreadable: {error})"
                found[path.stem] = (path, str(description))
    return found


def parse_probe_suite(raw: dict[str, Any], *, source: str = "<suite>", base_dir: Path = Path("."),
                      default_name: str = "suite") -> ProbeSuite:
    check = _Checker(source)
    check.known(raw, TOP_LEVEL_KEYS, "")
    name = raw.get("name", default_name)
    check.that(isinstance(name, str) and name.isprintable() and Path(name).name == name
               and name not in ("", ".", ".."), "name", f"must be a plain folder name, got {name!r}")
    archs = tuple(check.list_of(raw, "archs", str, ["standard", "looped", "flt"]))
    for arch in archs:
        check.that(arch in ARCHITECTURES, "archs", f"unknown architecture {arch!r}; choose from "
                                                   f"{', '.join(ARCHITECTURES)}")
    loops = tuple(check.list_of(raw, "loops", int, [1, 4, 12]))
    check.that(all(k >= 1 for k in loops), "loops", f"loop counts must be >= 1, got {list(loops)}")
    lrs = tuple(float(lr) for lr in check.list_of(raw, "lrs", (int, float), [3e-3]))
    check.that(all(0 < lr < math.inf for lr in lrs), "lrs",
               f"learning rates must be > 0 and finite, got {list(lrs)}")
    seeds = raw.get("seeds", 1)
    if is_int(seeds):
        check.that(seeds >= 1, "seeds", f"a count must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    seeds = tuple(check.list_of({"seeds": seeds}, "seeds", int, None))
    steps = raw.get("steps", 150)
    check.that(is_int(steps) and steps >= 1, "steps", f"must be an int >= 1, got {steps!r}")
    log_every = raw.get("log_every", 1)
    check.that(is_int(log_every) and log_every >= 1, "log_every", f"must be an int >= 1, got {log_every!r}")
    stop = raw.get("stop_on_collapse", False)
    check.that(isinstance(stop, bool), "stop_on_collapse", f"must be true or false, got {stop!r}")
    description = raw.get("description", "")
    check.that(isinstance(description, str), "description", "must be a string")

    model = _model(check, check.table(raw, "model"))
    train_values = dict(check.table(raw, "train"))  # a copy: the default below must follow --steps
    check.known(train_values, [f.name for f in fields(TrainConfig) if f.name not in GRID_OWNED_TRAIN_KEYS],
                "train", hint="steps, lrs and seeds are top-level keys")
    train_values = check.typed("train", TrainConfig, _nones(TrainConfig, train_values))
    train_values.setdefault("eval_every", max(steps // 4, 1))
    train = check.build("train", TrainConfig, steps=steps, lr=lrs[0], **train_values)
    data = _data(check, check.table(raw, "data"), base_dir, model)
    thresholds = check.table(raw, "detectors")
    check.known({key: None for key in thresholds if key in TOP_LEVEL_KEYS}, (), "detectors")
    for detector, values in thresholds.items():  # a top-level key written below [detectors.x]
        if isinstance(values, dict):
            check.known({key: None for key in values if key in TOP_LEVEL_KEYS}, (), f"detectors.{detector}")
    try:
        default_detectors(**thresholds)
    except ValueError as error:
        raise SuiteError(f"{source}: detectors: {error}") from None
    evaluation = check.table(raw, "eval")
    check.known(evaluation, EVAL_KEYS, "eval")
    eval_loops = tuple(check.list_of(evaluation, "loops", int, [], key="eval.loops"))
    check.that(all(k >= 1 for k in eval_loops), "eval.loops", "loop counts must be >= 1")
    examples = evaluation.get("examples", 256)
    check.that(is_int(examples) and examples >= 1, "eval.examples", f"must be an int >= 1, got {examples!r}")
    check.that(data.task is not None or "examples" not in evaluation, "eval.examples",
               "counts a task's examples for exact-match accuracy; text is evaluated on its validation "
               "batches (train.eval_batches)")
    return ProbeSuite(name=name, archs=archs, loops=loops, lrs=lrs, seeds=seeds, model=model,
                      train=train, data=data, thresholds=thresholds, log_every=log_every,
                      stop_on_collapse=stop, eval_loops=eval_loops, eval_examples=examples,
                      description=description, source=source, raw=raw, base_dir=base_dir)


def apply_overrides(suite: ProbeSuite, *, loops: int | None = None, archs: list[str] | None = None,
                    steps: int | None = None, lrs: list[float] | None = None, seeds: int | None = None,
                    data: list[Path] | None = None, size: str | None = None, optimizer: str | None = None,
                    schedule: str | None = None, log_every: int | None = None,
                    grad_accum_steps: int | None = None, precision: str | None = None,
                    parallel: str | None = None, stop_on_collapse: bool | None = None,
                    name: str | None = None, quick: bool = False) -> ProbeSuite:
    """Command-line options over a suite, checked exactly as the file's values are.

    `loops` keeps the suite's loop counts below it and adds it; `quick` makes a smoke
    run: the tiny preset, at most 40 steps, loops 1 and the largest, named `<name>-quick`.
    A size, step count or name given with it wins over its own (and is checked as always).
    """
    raw = copy.deepcopy(suite.raw)
    for option, value in (("--loops", loops), ("--steps", steps), ("--seeds", seeds),
                          ("--log-every", log_every), ("--grad-accum-steps", grad_accum_steps)):
        if value is not None and value < 1:
            raise SuiteError(f"{option} must be >= 1, got {value}")
    for option, value, choices in (("--optimizer", optimizer, OPTIMIZERS), ("--schedule", schedule, SCHEDULES),
                                   ("--precision", precision, PRECISIONS), ("--parallel", parallel, PARALLEL)):
        if value is not None and value not in choices:
            raise SuiteError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    if loops is not None:
        raw["loops"] = sorted({k for k in raw.get("loops", [1, 4, 12]) if k < loops} | {loops})
    given = {"archs": archs, "steps": steps, "lrs": lrs, "seeds": seeds, "log_every": log_every,
             "stop_on_collapse": stop_on_collapse, "name": name}
    raw.update({key: value for key, value in given.items() if value is not None})
    if data:
        raw["data"] = {"files": [str(Path(path).resolve()) for path in data]}
        raw.get("eval", {}).pop("examples", None)  # a task's example count, meaningless for text
    for section, key, value in (("model", "preset", size), ("train", "optimizer", optimizer),
                                ("train", "schedule", schedule), ("train", "grad_accum_steps", grad_accum_steps),
                                ("train", "precision", precision), ("train", "parallel", parallel)):
        if value is not None:
            raw.setdefault(section, {})[key] = value
    if quick:
        if name is None:
            raw["name"] = f"{suite.name}-quick"
        if size is None:
            sizes = ("preset", "d_model", "n_heads", "n_layers", "seq_len", "mlp_ratio")
            raw["model"] = {"preset": "tiny", **{k: v for k, v in raw.get("model", {}).items() if k not in sizes}}
        if steps is None:
            raw["steps"] = min(raw.get("steps", 150), 40)
        top = max(raw.get("loops", [1, 4, 12]))
        raw["loops"] = sorted({1, top})
        if raw.get("eval", {}).get("loops"):
            raw["eval"]["loops"] = sorted({1, top})
    options = [option for option, value in (
        ("--loops", loops), ("--arch", archs), ("--steps", steps), ("--lr", lrs), ("--seeds", seeds),
        ("--data", data), ("--size", size), ("--optimizer", optimizer), ("--schedule", schedule),
        ("--log-every", log_every), ("--grad-accum-steps", grad_accum_steps), ("--precision", precision),
        ("--parallel", parallel), ("--stop-on-collapse", stop_on_collapse), ("--name", name))
        if value is not None and value != []]
    options += ["--quick"] if quick else []
    source = f"{suite.source}{WITH_OPTIONS}{', '.join(options)}" if raw != suite.raw else suite.source
    changed = parse_probe_suite(raw, source=source, base_dir=suite.base_dir, default_name=suite.name)
    # A file that cannot be read is named where it was given: --data, or the suite's data.files.
    return changed.with_(data=replace(changed.data, origin="--data" if data else suite.data.origin))


def _model(check: _Checker, values: dict[str, Any]) -> ModelConfig:
    values = dict(values)
    size = values.pop("preset", "default")
    check.that(isinstance(size, str), "model.preset", f"must be a preset's name, got {size!r}")
    check.known(values, [f.name for f in fields(ModelConfig) if f.name != "n_loops"], "model",
                hint="loop counts are the top-level `loops`")
    values = check.typed("model", ModelConfig, _nones(ModelConfig, values))
    # Every token is a byte, of text or of a task's prompt: a smaller embedding fails mid-run.
    vocab_size = values.get("vocab_size", VOCAB_SIZE)
    check.that(vocab_size >= VOCAB_SIZE, "model.vocab_size",
               f"must be >= {VOCAB_SIZE} (the tokens are bytes), got {vocab_size}")
    try:
        return preset(size, **values)
    except (ValueError, TypeError) as error:
        raise SuiteError(f"{check.source}: model: {error}") from None


def _data(check: _Checker, values: dict[str, Any], base_dir: Path, model: ModelConfig) -> DataSpec:
    values = dict(values)
    if "task" not in values:
        check.known(values, ("files",), "data", hint="or task = one of " + ", ".join(TASKS))
        if "files" not in values:
            return DataSpec()
        # `files = []` is refused rather than read as the embedded corpus: leaving the key out says that.
        names = check.list_of(values, "files", str, None, key="data.files")
        try:
            # Absolute, so that the runs record the same files whatever the working directory
            # (a relative suite path would make them relative to it) and `--resume` matches.
            files = [str(Path(name).resolve()) for name in
                     expand_globs(base_dir / Path(name).expanduser() for name in names)]
        except DataError as error:
            raise SuiteError(f"{check.source}: data.files: {error}") from None
        twice = sorted({name for name in files if files.count(name) > 1})
        check.that(not twice, "data.files", f"names {', '.join(twice)} more than once (two spellings, or a "
                                            f"glob that matches a file also listed); each would be read twice")
        return DataSpec(files=tuple(files), origin=f"{check.source}: data.files")
    task = values.pop("task")
    check.that(isinstance(task, str) and task in TASKS, "data.task",
               f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    check.known(values, [f.name for f in fields(TASKS[task])], "data", hint=f"the {task} task's fields")
    built = check.build("data", TASKS[task], **values)
    for key, value in values.items():  # hops = [1, 1, 2] would draw 1 hop twice as often, unasked
        check.that(not isinstance(value, list) or len(set(value)) == len(value), f"data.{key}",
                   f"has duplicates: {value!r}")
    check.that(built.seq_len <= model.seq_len, "data.task",
               f"{task} examples are {built.seq_len} tokens, longer than model.seq_len={model.seq_len}")
    return DataSpec(task=task, task_options=values)


def _home_of(key: str, section: str) -> str:
    """Where a key unknown in `section` belongs, if elsewhere: TOML puts every key after a
    [table] header into that table, so a top-level key written below one lands there."""
    if section and key in TOP_LEVEL_KEYS:
        return f"`{key}` is a top-level key: write it above the first [table] header"
    for table, keys in (("model", {"preset", *(f.name for f in fields(ModelConfig))}),
                        ("train", {f.name for f in fields(TrainConfig)})):
        if table != section and key not in GRID_OWNED_TRAIN_KEYS and key in keys:
            return f"`{key}` belongs in [{table}]"
    return ""


def _nones(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: `false` switches off a setting that takes None (grad_clip = false)."""
    optional = {f.name for f in fields(cls) if "None" in str(f.type)}
    return {k: None if v is False and k in optional else v for k, v in values.items()}


class _Checker:
    """Raises `SuiteError`s that all name the file."""

    def __init__(self, source: str):
        self.source = source

    def that(self, ok: bool, key: str, reason: str) -> None:
        if not ok:
            raise SuiteError(f"{self.source}: {key}: {reason}")

    def known(self, values: dict[str, Any], allowed: Any, section: str, hint: str = "") -> None:
        for key in values:
            if key not in allowed:
                where = f"{section}.{key}" if section else key
                home = _home_of(key, section)
                self.that(not home, where, f"unknown key here; {home}")
                self.that(False, where, f"unknown key; valid: {', '.join(allowed)}"
                          + (f" ({hint})" if hint else ""))

    def typed(self, section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
        """`values` checked against `cls`'s field types, which the dataclasses do not all
        check: a string is a true switch there (qk_norm = "false" is on), `true` the number 1."""
        hints = get_type_hints(cls)
        for key, value in values.items():
            hint = hints[key]
            kinds = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
            if value is None and type(None) in kinds:
                continue
            if bool in kinds:
                ok, expected = isinstance(value, bool), "true or false"
            elif int in kinds:
                ok, expected = is_int(value), "an integer"
            elif float in kinds:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                expected = "a finite number"
            elif str in kinds:
                ok, expected = isinstance(value, str), "a string"
            else:  # betas, a pair: TrainConfig checks it whole
                continue
            switched_off = " or false" if type(None) in kinds else ""
            self.that(ok, f"{section}.{key}", f"must be {expected}{switched_off}, got {value!r}")
        return values

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        self.that(isinstance(value, dict), key, f"must be a table ([{key}]), got {value!r}")
        return value

    def list_of(self, raw: dict[str, Any], name: str, kind: Any, default: list | None,
                key: str | None = None) -> list:
        key = key or name
        value = raw.get(name, default)
        self.that(isinstance(value, list) and len(value) > 0 or (value == [] and default == []),
                  key, f"must be a non-empty list, got {value!r}")
        for item in value:
            ok = isinstance(item, kind) and not isinstance(item, bool)
            self.that(ok, key, f"{item!r} is not a {getattr(kind, '__name__', 'number')}")
        self.that(len(set(value)) == len(value), key, f"has duplicates: {value!r}")
        return list(value)

    def build(self, section: str, cls: type, **values: Any) -> Any:
        try:
            return cls(**values)
        except (ValueError, TypeError) as error:
            raise SuiteError(f"{self.source}: {section}: {error}") from None
