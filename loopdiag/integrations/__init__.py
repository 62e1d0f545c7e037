"""Loop diagnostics inside third-party trainers, one module per trainer library:

    from loopdiag.integrations.lightning import LoopdiagCallback     # pip install 'loopdiag[lightning]'
    from loopdiag.integrations.huggingface import LoopdiagCallback   # pip install 'loopdiag[hf]'

Each callback attaches a `LoopRecorder` when training starts, feeds every record to a
`Monitor` (a stop at `stop_on` ends training) and to an optional run store, and hands the
flattened record (`resid_norm/loop_03`, ...) to the trainer's own logging. The trainer
libraries are imported only by those modules, never by `import loopdiag`.
"""
