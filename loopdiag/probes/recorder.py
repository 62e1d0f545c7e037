"""The loop recorder: hooks that see every loop of a weight-tied model, one record per
logged step.

How loops are counted: a forward pre-hook and an always-called forward hook on the root
model bracket each forward; inside one, every call of the loop module is the next loop.
Calls outside a root forward are not loops: activation-checkpoint recomputation during
backward (`torch.utils.checkpoint`, either flavour) re-runs the module then, and is
ignored. The count may differ from one forward to the next.

Several forwards in one step (gradient accumulation) are averaged per loop over the
forwards that reached that loop (so `act_grad_norm` is the mean of the micro-batches'
norms, not the norm of their summed gradient). If any forward of the step ran with
gradients enabled, forwards without (evaluation batches between two steps) are left out.

Which step is running is only known at `end_step(step)`; hooks decide whether to collect
from the expected step: `begin_step(step)` if called, else the one after the last
`end_step` (0 at first). On steps that are not logged every hook returns at once;
`after_backward` still adds the shared-grad norm to the window, and keeps the flat
gradient when the next step is logged.

Under torch.distributed (data parallel: the same weights on every rank, each rank its own
rows of one global batch) every rank must call `end_step` on the same steps: there the
ranks' forward statistics are combined into those of the global batch, so each rank gets
the same record, equal to one process's over the global batch (the detectors then agree
everywhere). How each combines:
  resid_norm, rel_update  token sums and token counts add up: the mean over all tokens
  token_corr              unit vectors' deviations from their sequence's mean add in squares
                          (sequences stay whole)
  act_grad_norm           sqrt of the ranks' summed squares / world size: DDP averages the
                          ranks' losses, so each rank's part of dloss/dx is its own / n
  attn_entropy, resid_norm/layer_NN   means over equal slices: averaged
  attn_max_logit          max: a max over the batch is the max of the ranks' maxima
  loss                    a tensor (a rank's own loss) is averaged; a float is taken as
                          already global (the trainer passes its mean over ranks)
A spike on one rank's rows stays visible: its tokens are part of every mean, and a
non-finite value on any rank makes the combined value non-finite. No max is taken where the
statistic is a mean, so the record still equals a one-process run's and the detectors'
thresholds keep their meaning. Gradient statistics need no combining under DDP:
`after_backward` comes after backward, when DDP has already averaged the gradients on
every rank. Under FSDP2 (`fully_shard`: DTensor parameters and gradients, each rank holding
a shard of the averaged gradient) the gradient statistics are sums over coordinates taken on
each rank's shard and added with one more all-reduce per logged step (see
`loopdiag.probes.gradients`); nothing is gathered. Activations are not sharded, so the
forward statistics combine as under DDP. The recorder may be attached before the model is
sharded.

Under torch.autocast the loop statistics are computed in fp32 from the loop's output.

Dropout (`rerun_without_dropout`): the inputs of each training forward of a logged step are
kept, and `after_backward` runs them again through the model in eval mode without gradients
(the weights are still those of the forward; the random-number state is restored after it,
so training is unchanged). The per-loop sums of that forward replace the training forward's,
but for `act_grad`, which only the training forward has. A rerun that reaches a different
number of loops (a model that draws its loop count in training only) leaves the training
forward's sums. Not under torch.compile (the rerun would be traced into the graph) nor with
sharded (FSDP2) parameters: there the sums stay the training forward's.

Under torch.compile the module hooks are traced into the model's graph: their reductions
become graph ops and their bookkeeping (buffers, lists) Dynamo's replayed side effects, so
`torch.compile(model)` stays one graph (two when `log_every` > 1: collecting or not is a
guard). The one hook that cannot be traced is the tensor hook behind `act_grad_norm`: it
writes from the backward pass into a Python dict, a graph break, and a break inside the
model's loop makes Dynamo run the whole forward eagerly (7 graphs for K = 4 instead of 1).
So it is not registered while compiling, and compiled forwards record no `act_grad_norm`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.linalg import vector_norm
from torch.utils.hooks import RemovableHandle

from loopdiag import distributed
from loopdiag.probes.costly import CostlyProbes
from loopdiag.probes.gradients import GradientProbe
from loopdiag.probes.records import (
    ForwardBuffer,
    Record,
    forward_stats,
    records_frame,
    records_loop_frame,
    reduce_over_ranks,
    to_host,
)
from loopdiag.probes.stats import LoopSums, PackedSequences, as_sequences, reduce_loop_output

if TYPE_CHECKING:
    import pandas as pd


class LoopRecorder:
    """Built by `attach`; see `loopdiag.probes` for the statistics and their keys."""

    def __init__(self, model: nn.Module, loop_module: nn.Module, shared_params: list[nn.Parameter], *,
                 stats: str, log_every: int, costly_every: int, window: int,
                 rerun_without_dropout: bool = False, expected_loops: int | None = None):
        self.model, self.loop_module = model, loop_module
        self.expected_loops = expected_loops
        self._warned_loop_count = False
        # with `loops=` the count itself is checked, at every logged step
        self._placement_check = LoopPlacementCheck(model, loop_module) if expected_loops is None else None
        self.rerun_without_dropout = rerun_without_dropout
        self.stats, self.log_every, self.costly_every = stats, log_every, costly_every
        self.records: list[Record] = []
        self._grads = GradientProbe(model, shared_params, window)
        self._step = 0  # the step expected to be running
        self._last_step: int | None = None
        self._closed_a_step = False
        self._backward_ran = False  # since the last step closed
        self._warned_backwards = False
        self._collecting = self.logs_step(0)
        self._logged_count = 0
        self._depth = 0  # nesting of root forwards
        self._current: ForwardBuffer | None = None  # the root forward running, when collecting
        self._prev_output: Tensor | None = None  # the previous loop's output, for rel_update
        self._forwards: list[ForwardBuffer] = []
        self._tensor_hooks: list[RemovableHandle] = []
        self._reruns: list[tuple[ForwardBuffer, tuple, dict[str, Any]]] = []  # (forward, args, kwargs)
        self._rerunning = False
        self._position_ids_index = _positional_index(model, "position_ids")
        self._handles = [
            model.register_forward_pre_hook(self._enter_root, with_kwargs=True),
            model.register_forward_hook(self._exit_root, always_call=True),
            loop_module.register_forward_hook(self._on_loop),
        ]
        if stats == "full":
            shared_ids = {id(p) for p in shared_params}
            self._handles += CostlyProbes(model, shared_ids, lambda: self._current).handles
        self.attached = True

    # --- the training-loop interface -------------------------------------------------

    def logs_step(self, step: int) -> bool:
        """Every `log_every`-th step, the first step of a run whatever its number (the first
        update is where a learning rate too large shows most: `update_size`, 1.4× the
        weights' norm at step 1 of a collapsing run, 0.3× three steps later), and the run's
        `last_step` when it is known."""
        return step % self.log_every == 0 or not self._closed_a_step or step == self._last_step

    @property
    def last_step(self) -> int | None:
        """The run's last step, logged whatever `log_every`: a verdict reads the end of a run
        (its final loss against what the model should reach), and with sparse logging the
        last logged step can lie far before it. None (default): unknown, not logged for it.
        A trainer that knows its length sets it before that step runs."""
        return self._last_step

    @last_step.setter
    def last_step(self, step: int | None) -> None:
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"last_step must be a step number (an integer >= 0) or None, got {step!r}")
        self._last_step = step
        self._collecting = self.logs_step(self._step)  # the step expected next may be it

    def begin_step(self, step: int) -> None:
        """Optional: announce the step about to run; anything collected since the last
        `end_step` is dropped."""
        self._check_attached()
        self._step, self._collecting = step, self.logs_step(step)
        self._backward_ran = False
        self._forwards.clear()
        self._reruns.clear()
        self._remove_tensor_hooks()
        self._grads.discard()

    def after_backward(self) -> None:
        """Call once per step after the backward pass(es), before clipping and the optimizer
        (called once per micro-batch instead, it warns once and only its last call counts)."""
        self._check_attached()
        if self._backward_ran and not self._warned_backwards:
            self._warned_backwards = True
            warnings.warn("after_backward() ran twice in one step: only its last call counts, and each "
                          "costs a pass over the gradients; call it once per optimizer step, after the "
                          "last micro-batch's backward", stacklevel=caller_stacklevel())
        self._grads.after_backward(self._step, self._collecting, self.logs_step(self._step + 1),
                                   again=self._backward_ran)
        self._backward_ran = True
        self._rerun()

    def end_step(self, step: int, *, loss: Tensor | float | None = None, lr: float | None = None,
                 grad_norm: Tensor | float | None = None, force: bool = False) -> Record | None:
        """Close `step` (after the optimizer step). On a logged step: sync once, store and
        return the record; otherwise return None at no cost. `grad_norm` (pre-clip, when
        the caller has it) replaces the one computed in `after_backward`. `force` records
        an unlogged step with what it has (the scalars given): the step a run diverged at,
        whose non-finite loss is the verdict."""
        self._check_attached()
        forwards, self._forwards = self._forwards, []
        self._reruns.clear()
        self._remove_tensor_hooks()
        logged = self.logs_step(step) or force
        self._closed_a_step, self._backward_ran = True, False
        self._step, self._collecting = step + 1, self.logs_step(step + 1)
        if not logged:
            self._grads.discard()
            return None
        grads = self._grads.take()
        forwards = [forward for forward in forwards if forward.grad_enabled] or forwards
        if distributed.world_size() > 1:
            reduce_over_ranks(forwards)
            if isinstance(loss, Tensor):
                loss = distributed.mean_over_ranks(loss)
        synced = to_host({
            "forwards": [(f.loops, f.attention, f.layer_norms) for f in forwards],
            "grads": grads,
            "scalars": {name: _as_scalar(name, value) for name, value in
                        (("loss", loss), ("lr", lr), ("grad_norm", grad_norm)) if value is not None},
        })
        record: Record = {"step": step, **synced["scalars"]}
        if grads is not None:
            for name, value in self._grads.finish(synced["grads"]).items():
                record.setdefault(name, value)  # a grad_norm given by the caller wins
        if forwards:
            record.update(forward_stats(synced["forwards"]))
            self._check_loop_count(step, record["n_loops"])
        self._logged_count += 1
        self.records.append(record)
        return record

    def _check_loop_count(self, step: int, n_loops: int) -> None:
        if self.expected_loops in (None, n_loops) or n_loops == 0 or self._warned_loop_count:
            return  # a forward without any loop is the session's warning
        self._warned_loop_count = True
        module = type(self.loop_module).__name__
        hint = (" once per forward: it is outside the loop, or is the whole stack of loops"
                if n_loops == 1 else f" {n_loops} times")
        warnings.warn(f"step {step}: loop_module ({module}) ran{hint}, not loops={self.expected_loops}; "
                      f"every statistic is per call of it, so name the module that runs once per loop "
                      f"(and give loops= only when the count is fixed)", stacklevel=caller_stacklevel())

    @property
    def latest(self) -> Record | None:
        """The last logged step's record."""
        return self.records[-1] if self.records else None

    def frame(self) -> pd.DataFrame:
        """One row per logged step; per-loop values as columns `resid_norm/loop_01`, ..."""
        return records_frame(self.records)

    def loop_frame(self) -> pd.DataFrame:
        """Long format: columns step, loop (1-based), stat, value."""
        return records_loop_frame(self.records)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the statistics that span steps (the
        gradient-oscillation window); a checkpoint stores it."""
        return {"gradients": self._grads.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grads.load_state_dict(state["gradients"])
        # A resumed run is past its first step: it logs every `log_every`-th, as if never stopped.
        self._closed_a_step = True
        self._collecting = self.logs_step(self._step)

    def detach(self) -> None:
        """Remove every hook this recorder registered (module and tensor hooks); the records stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_tensor_hooks()
        self._forwards.clear()
        self._reruns.clear()
        self._current = self._prev_output = None
        self.attached = False

    def __enter__(self) -> LoopRecorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.detach()

    # --- hooks -----------------------------------------------------------------------

    def _enter_root(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._depth += 1
        if (self._depth == 1 and self._placement_check is not None and not self._rerunning
                and not torch.compiler.is_compiling()):
            self._placement_check.start()
        if self._depth == 1 and self._collecting:
            costly = (not self._rerunning and self.stats == "full"
                      and self._logged_count % self.costly_every == 0)
            self._current = ForwardBuffer(grad_enabled=torch.is_grad_enabled(), costly=costly,
                                          rows=_input_rows(args, kwargs),
                                          packed=_packed_sequences(self._position_ids(args, kwargs)))
            if (self.rerun_without_dropout and not self._rerunning and module.training
                    and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
                self._reruns.append((self._current, args, kwargs))

    def _position_ids(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        index = self._position_ids_index
        if "position_ids" in kwargs or index is None or index >= len(args):
            return kwargs.get("position_ids")
        return args[index]

    def _exit_root(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)  # an always-called hook may run without its pre-hook
        if self._depth == 0 and self._placement_check is not None and self._placement_check.started:
            message, self._placement_check = self._placement_check.finish(), None
            if message is not None:
                warnings.warn(message, stacklevel=caller_stacklevel())
        if self._depth == 0 and self._current is not None:
            self._forwards.append(self._current)
            self._current = self._prev_output = None

    def _on_loop(self, module: nn.Module, args: tuple, output: Any) -> None:
        forward = self._current
        if forward is None:  # not collecting, or outside a root forward (recomputation)
            return
        x = _loop_tensor(output)
        seqs = as_sequences(x, forward.rows)
        packed = forward.packed
        if packed is not None and seqs.shape[:2] != (1, packed.ids.numel()):
            packed = None  # the output is not the packed row (a model that unpacks it)
        elif packed is not None and packed.ids.device != seqs.device:
            packed = forward.packed = packed.to(seqs.device)
        # In fp32 whatever the forward's precision: a bf16 sum of T unit vectors loses the
        # digits token_corr is read from. Autocast is only entered where it is on: entering
        # and leaving it took 0.4 ms per forward of the user's 12-loop model of
        # `benchmarks/overhead.py`, a fifth of its reductions' 2.0 ms.
        autocast_off = (torch.autocast(x.device.type, enabled=False)
                        if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext())
        with autocast_off:
            seqs = seqs.float()
            sums = reduce_loop_output(seqs, self._prev_output, packed)
        self._prev_output = seqs
        # A tensor hook that writes outside the graph breaks it, and a break inside the
        # model's loop sends its whole forward back to eager: compiled, no act_grad_norm.
        if x.requires_grad and not torch.compiler.is_compiling():
            sums["act_grad"] = None  # filled in by the backward pass
            self._tensor_hooks.append(x.register_hook(functools.partial(self._on_loop_grad, sums)))
        forward.loops.append(sums)

    def _rerun(self) -> None:
        """The kept training forwards run again in eval mode without gradients; their loop
        sums replace the training forward's, `act_grad` kept (see the module docstring)."""
        reruns, self._reruns = self._reruns, []
        if not reruns or any(isinstance(p, DTensor) for p in self.model.parameters()):
            return
        modes = [(module, module.training) for module in self.model.modules()]
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        trained, self._forwards = self._forwards, []
        self._rerunning = True
        try:
            self.model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for _, args, kwargs in reruns:
                    self.model(*args, **kwargs)
        except Exception as error:  # a probe must not end the training: record without reruns
            self.rerun_without_dropout = False
            self._forwards = []
            warnings.warn(f"rerun_without_dropout is off from step {self._step}: the model's forward "
                          f"failed in eval mode without gradients ({type(error).__name__}: {error}); "
                          "its loop statistics are now the training forward's, dropout noise and all",
                          stacklevel=caller_stacklevel())
        finally:
            self._rerunning = False
            self._depth, self._current, self._prev_output = 0, None, None
            for module, mode in modes:
                module.training = mode
            clean, self._forwards = self._forwards, trained
        for (forward, _, _), rerun in zip(reruns, clean):
            if len(rerun.loops) != len(forward.loops):
                continue
            for sums, clean_sums in zip(forward.loops, rerun.loops):
                gradient = {"act_grad": sums["act_grad"]} if "act_grad" in sums else {}
                sums.clear()
                sums.update(clean_sums, **gradient)

    @staticmethod
    def _on_loop_grad(sums: LoopSums, grad: Tensor) -> None:
        sums["act_grad"] = vector_norm(grad.detach(), dtype=torch.float32)

    def _remove_tensor_hooks(self) -> None:
        for handle in self._tensor_hooks:
            handle.remove()
        self._tensor_hooks.clear()

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this LoopRecorder is detached; attach a new one to keep recording")


class LoopPlacementCheck:
    """Over the first forward: whether a loop module that ran once misses the loop, read from
    a module that ran again and again (its hooks live for that one forward):
      inside it   the whole stack named instead of the block it repeats: a submodule called
                  two or more times that holds at least half its weights;
      outside it  a module before or after the loop named (the embedding, the final norm, a
                  weightless marker): a module called two or more times whose calls apply
                  (calls × weights: the forward's work) at least as many weights as the named
                  module's one call, or as half the model's.
    Either way the outermost such module is named as the one to pass."""

    def __init__(self, model: nn.Module, loop_module: nn.Module):
        self.model, self.loop_module = model, loop_module
        self.calls: Counter[nn.Module] = Counter()
        self._handles: list[RemovableHandle] = []
        self.started = False

    def start(self) -> None:
        self.started = True
        self._handles = [module.register_forward_pre_hook(self._count) for module in self.model.modules()]

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.calls[module] += 1

    def finish(self) -> str | None:
        """Remove the hooks; the warning to give, if any."""
        for handle in self._handles:
            handle.remove()
        if self.calls[self.loop_module] != 1:
            return None
        weights, half_the_model = _weight_count(self.loop_module), _weight_count(self.model) / 2
        # a large embedding or head named, or a weightless marker: the loop does half the work
        outside_bar = min(weights, half_the_model) if weights else half_the_model
        inside = {id(module) for module in self.loop_module.modules()}

        def holds_the_loop(module: nn.Module, calls: int) -> bool:
            held = _weight_count(module)
            if calls < 2 or not held:
                return False
            return 2 * held >= weights if id(module) in inside else calls * held >= outside_bar

        repeated = [module for module, calls in self.calls.items() if holds_the_loop(module, calls)]
        if not repeated:
            return None
        paths = {module: name for name, module in self.model.named_modules()}
        loop = min(repeated, key=lambda module: paths[module].count("."))  # the outermost
        where = (f"{paths[loop]!r} inside it ran {self.calls[loop]} times and holds half its weights or more"
                 if id(loop) in inside else f"{paths[loop]!r} ran {self.calls[loop]} times")
        return (f"loop_module {paths[self.loop_module]!r} ran once in the forward, but {where}: if that is "
                f"the loop, pass loop_module={paths[loop]!r}; as it is, the model records as one loop "
                "(loops=K turns this guess off)")


def _weight_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def caller_stacklevel() -> int:
    """The `stacklevel` that makes a warning issued by the calling function point at the first
    frame outside loopdiag and torch: the user's line, whichever of attach's recorder, a
    session, a trainer callback or a module hook (torch's module call) it came through."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("loopdiag", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _input_rows(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """(B, T) of each tensor argument of the root forward with 2 or more dims (token ids
    (B, T), embeddings (B, T, d), masks, position ids (1, T)), in call order."""
    return tuple((value.size(0), value.size(1)) for value in (*args, *kwargs.values())
                 if isinstance(value, Tensor) and value.dim() >= 2)


def _positional_index(model: nn.Module, name: str) -> int | None:
    """Where the model's forward takes argument `name` by position, or None (keyword-only,
    absent, or a forward of `*args`, as a wrapper's)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-extension forward
        return None
    for index, parameter in enumerate(parameters):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return None
        if parameter.name == name:
            return index
    return None


def _packed_sequences(positions: Any) -> PackedSequences | None:
    """The sequences of a packed batch: integer `position_ids` of shape (1, N) that restart
    (several sequences in one row, as Hugging Face's `DataCollatorWithFlattening` passes
    them to varlen attention), by keyword or by position. Ids that never restart make one
    sequence, as without them."""
    if (not isinstance(positions, Tensor) or positions.dim() != 2 or positions.size(0) != 1
            or positions.size(1) < 2 or positions.is_floating_point() or positions.is_complex()):
        return None
    return PackedSequences.from_position_ids(positions)


def _loop_tensor(output: Any) -> Tensor:
    """The hidden state in what the loop module returned: the tensor itself, or the first
    item of a tuple or list, or the first value of a mapping (a Hugging Face `ModelOutput`)."""
    first = output
    if isinstance(output, (tuple, list)) and output:
        first = output[0]
    elif isinstance(output, Mapping) and output:
        first = next(iter(output.values()))
    if not isinstance(first, Tensor):
        raise TypeError(f"the loop module returned {type(output).__name__}; the recorder needs a "
                        "tensor (..., tokens, features), or a tuple, list or mapping whose first item is one")
    if first.dim() < 2:
        raise ValueError(f"the loop module returned a tensor of shape {tuple(first.shape)}; the recorder "
                         "needs one of (..., tokens, features): name the module whose output is the "
                         "hidden state each loop passes on")
    return first


def _as_scalar(name: str, value: Tensor | float) -> Tensor | float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if isinstance(value, DTensor):  # a norm over sharded gradients (FSDP2's clip_grad_norm_)
            value = value.full_tensor()
        return value.detach().reshape(())
    return float(value)
