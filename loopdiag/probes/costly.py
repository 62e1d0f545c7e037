"""The costly tier (`stats="full"`): per loop, attention entropy and max pre-softmax logit,
and the residual norm after each layer. It needs our reference models' `Attention` and
`Block` modules, hooked only where they belong to the shared (looped) parameters so a
prelude or coda is never attributed to a loop; on other models it finds nothing to hook
and records nothing.

A call belongs to the loop whose `loop_module` call comes next, i.e. the loop index is the
number of loop-module calls already made in this forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.linalg import vector_norm
from torch.utils.hooks import RemovableHandle

from loopdiag.models.layers import Attention, Block
from loopdiag.probes.records import ForwardBuffer
from loopdiag.probes.stats import attention_stats


class CostlyProbes:
    def __init__(self, model: nn.Module, shared_ids: set[int],
                 current_forward: Callable[[], ForwardBuffer | None]):
        self._current_forward = current_forward
        self.handles: list[RemovableHandle] = []
        for module in model.modules():
            params = list(module.parameters())
            if not params or not all(id(p) in shared_ids for p in params):
                continue
            if isinstance(module, Attention):
                self.handles.append(module.register_forward_hook(self._on_attention, with_kwargs=True))
            elif isinstance(module, Block):
                self.handles.append(module.register_forward_hook(self._on_block))

    def _costly_forward(self) -> ForwardBuffer | None:
        forward = self._current_forward()
        return forward if forward is not None and forward.costly else None

    def _on_attention(self, module: Attention, args: tuple, kwargs: dict[str, Any], output: Tensor) -> None:
        forward = self._costly_forward()
        if forward is None:
            return
        x = args[0] if args else kwargs["x"]
        query_source = args[1] if len(args) > 1 else kwargs.get("query_source")
        calls = forward.attention.setdefault(len(forward.loops), [])
        with torch.autocast(x.device.type, enabled=False):  # logits and entropy in fp32
            calls.append(attention_stats(module, x.float(),
                                         None if query_source is None else query_source.float()))

    def _on_block(self, module: Block, args: tuple, output: Tensor) -> None:
        forward = self._costly_forward()
        if forward is None:
            return
        layer_norm = vector_norm(output.detach(), dim=-1, dtype=torch.float32).mean()
        forward.layer_norms.setdefault(len(forward.loops), []).append(layer_norm)
