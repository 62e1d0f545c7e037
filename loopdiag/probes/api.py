"""`attach`: validate the arguments, find the loop module and the shared weights, and
build a `LoopRecorder`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import nn

from loopdiag.probes.recorder import LoopRecorder

STAT_TIERS = ("cheap", "full")
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def attach(model: nn.Module, loop_module: str | nn.Module | None = None, *, stats: str = "cheap",
           log_every: int = 1, costly_every: int = 50, window: int = 32,
           shared_params: Iterable[nn.Parameter] | None = None,
           rerun_without_dropout: bool | None = None, loops: int | None = None) -> LoopRecorder:
    """Record per-loop statistics of `model` every `log_every` steps, and at its first step.

    loop_module: the module that runs once per loop: a dotted attribute path
        ("encoder.layer_group"), the module itself, or None for `model.loop_out`. It must
        return the hidden state (..., tokens, features), or a tuple, list or mapping (a
        Hugging Face `ModelOutput`) whose first item is that. A 2-D output is one sequence,
        or, with B·T rows for a model input (B, T, ...) with B > 1, its B sequences
        flattened. A packed batch (1, N), sequences laid end to end, is read as its
        sequences when the model is called with integer `position_ids` (1, N), by
        keyword or by position, that restart at each one (Hugging Face's
        `DataCollatorWithFlattening`).
    stats: "cheap" (every logged step) or "full" (adds attention and per-layer statistics
        every `costly_every` logged steps; our reference models only).
    window: steps (logged or not) behind `gnorm_cv` and `gnorm_autocorr`; at least 3.
    shared_params: the weights reused every loop, for the oscillation and update-ratio
        statistics; default `model.shared_parameters()` when the model has it, else the
        loop module's parameters, else every trainable parameter.
    rerun_without_dropout: take the per-loop statistics of each logged training forward from
        a second forward of the same inputs, without gradients and in eval mode (dropout
        off); `act_grad_norm` stays the training forward's. Dropout noise keeps positions
        from ever reading as identical and loops from reading as still, so the collapse
        detectors cannot see through it. It costs a forward without gradients per logged
        step. None (default): when the model holds dropout with p > 0 (`applies_dropout`);
        True also for dropout it applies functionally.
    loops: how many times `loop_module` runs in each training forward, when that is fixed.
        A logged step whose forward ran it another number of times warns, once: a
        `loop_module` that runs once per forward (the whole stack, or a module outside
        the loop) records every model as one loop, and the per-loop detectors see nothing.
        Without it, the first forward warns where the loop module ran once and another
        ran again and again: inside it, holding at least half its weights (the loop it
        holds), or outside it, its calls applying at least as many weights as the loop
        module's one call or as half the model's (the loop it misses); the warning names
        that module.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if stats not in STAT_TIERS:
        raise ValueError(f"stats must be one of {STAT_TIERS}, got {stats!r}")
    if rerun_without_dropout is not None and not isinstance(rerun_without_dropout, bool):
        raise ValueError(f"rerun_without_dropout must be True, False or None, got {rerun_without_dropout!r}")
    for name, value, least in (("log_every", log_every, 1), ("costly_every", costly_every, 1),
                               ("window", window, 3), ("loops", 1 if loops is None else loops, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    module = _resolve_loop_module(model, loop_module)
    shared = _resolve_shared_params(model, module, shared_params)
    rerun = applies_dropout(model) if rerun_without_dropout is None else rerun_without_dropout
    return LoopRecorder(model, module, shared, stats=stats, log_every=log_every,
                        costly_every=costly_every, window=window, rerun_without_dropout=rerun,
                        expected_loops=loops)


def applies_dropout(module: nn.Module) -> bool:
    """Whether `module` holds a dropout layer, or attention with dropout, of p > 0 (active
    in training mode)."""
    return any((isinstance(m, DROPOUT_MODULES) and m.p > 0)
               or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0) for m in module.modules())


def _resolve_loop_module(model: nn.Module, loop_module: str | nn.Module | None) -> nn.Module:
    children = ", ".join(name for name, _ in model.named_children()) or "none"
    if loop_module is None:
        hook_point = getattr(model, "loop_out", None)
        if isinstance(hook_point, nn.Module):
            return hook_point
        raise ValueError(
            f"{type(model).__name__} has no `loop_out` hook point: pass loop_module=, the module "
            f"that runs once per loop, as a dotted path or the module itself (its children: {children})")
    if isinstance(loop_module, str):
        try:
            # "" names the model itself, refused below
            loop_module = model.get_submodule(loop_module) if loop_module else model
        except AttributeError:
            names = [name for name, _ in model.named_modules() if name]
            close = difflib.get_close_matches(loop_module, names, n=5, cutoff=0.4)
            hint = f"close names: {', '.join(close)}" if close else f"its children: {children}"
            raise ValueError(f"{type(model).__name__} has no submodule {loop_module!r}; {hint}") from None
    if isinstance(loop_module, nn.Module):
        if loop_module is model:
            raise ValueError("loop_module is the model itself, which runs once per forward; "
                             "name the module that runs once per loop")
        if not any(module is loop_module for module in model.modules()):
            raise ValueError(f"loop_module ({type(loop_module).__name__}) is not a submodule of the model")
        return loop_module
    raise ValueError(f"loop_module must be a dotted path, a module or None, got {type(loop_module).__name__}")


def _resolve_shared_params(model: nn.Module, loop_module: nn.Module,
                           shared_params: Iterable[nn.Parameter] | None) -> list[nn.Parameter]:
    if shared_params is None:
        if callable(getattr(model, "shared_parameters", None)):
            shared = list(model.shared_parameters())
        else:
            shared = list(loop_module.parameters()) or list(model.parameters())
    else:
        shared = list(shared_params)
        model_ids = {id(p) for p in model.parameters()}
        if not all(isinstance(p, nn.Parameter) and id(p) in model_ids for p in shared):
            raise ValueError("shared_params must be parameters of the model")
    shared = list({id(p): p for p in shared if p.requires_grad}.values())  # tied weights once
    if not shared:
        raise ValueError("no trainable shared parameters: pass shared_params=, the weights reused every loop")
    return shared
