"""Runs: a probe suite's spec (`probe_suite`), many runs (`launch`), one run (`runner`) and
the session every run goes through (`session`), with its W&B sink (`wandb_logging`).
Modules are imported one by one: this package imports nothing itself."""
