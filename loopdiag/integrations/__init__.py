"""Loop diagnostics inside third-party trainers, one module per trainer library:

    from loopdiag.integrations.lightning import LoopdiagCallback     # pip install 'loopdiag[lightning]'
    from loopdiag.integrations.huggingface import LoopdiagCallback   # pip install 'loopdiag[hf]'

Each callback drives a `loopdiag.run.session.RunSession`: it attaches a `LoopRecorder`
when training starts, feeds every record to a `Monitor` (a stop at `stop_on` ends
training) and to an optional run store, and hands the flattened record
(`resid_norm/loop_03`, ...) to the trainer's own logging. The trainer libraries are
imported only by those modules, never by `import loopdiag`.
"""

from loopdiag.probes import Record, flatten_record


def log_values(record: Record) -> dict[str, float]:
    """The record as a trainer logger takes it: per-loop lists as `resid_norm/loop_03`, ...;
    `step` left out, since loggers take the step separately."""
    return {key: value for key, value in flatten_record(record).items() if key != "step"}
