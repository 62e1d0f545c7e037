"""Optimizers and learning-rate schedules.

Parameter roles are decided by module type, never by parameter name:
- embeddings: parameters of `nn.Embedding` modules;
- output head: the parameters of `output_layer`, by default `model.lm_head` when the
  model has one (a head tied to the embedding is the same tensor, so it counts once);
- hidden matrices: the weights of every other `nn.Linear`: the block projections, plus
  any adapter that maps the hidden state to itself.

"muon" (the FLT paper's recipe) gives the hidden matrices to `torch.optim.Muon`, which
only handles 2-D tensors, and everything else to AdamW. A matrix held as a bare
`nn.Parameter` (not inside an `nn.Linear`) stays with AdamW: AdamW is correct for any
tensor, whereas orthogonalising the update of, say, a positional table is not.

Weight decay (AdamW) applies to tensors with >= 2 dims that are not embeddings. Norm
gains and biases are left alone because decay pulls a gain towards 0 and so changes the
scale of the stream, not the capacity; embeddings because a row only gets gradient when
its token appears, so for rare tokens decay would dominate the learning signal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loopdiag.train.config import TrainConfig


def build_optimizers(model: nn.Module, cfg: TrainConfig,
                     output_layer: nn.Module | None = None) -> list[torch.optim.Optimizer]:
    """AdamW over everything ("adamw"), or Muon for hidden matrices + AdamW ("muon").

    AdamW always comes first in the list. Each param group keeps its base learning
    rate under `initial_lr`; `set_lr_multiplier` scales from there.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                     for p in m.parameters(recurse=False)}
    head = output_layer if output_layer is not None else getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    linear_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}

    muon_params: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        is_embedding = id(p) in embedding_ids
        if (cfg.optimizer == "muon" and p.ndim == 2 and id(p) in linear_weight_ids
                and not is_embedding and id(p) not in head_ids):
            muon_params.append(p)
        elif p.ndim >= 2 and not is_embedding:
            decay.append(p)
        else:
            no_decay.append(p)

    optimizers: list[torch.optim.Optimizer] = []
    adamw_groups = [{"params": group, "weight_decay": wd}
                    for group, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if group]
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas))
    if muon_params:
        optimizers.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr,
                                           weight_decay=cfg.weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on every base learning rate for the update at 0-based `step`.

    Evaluated at `step == cfg.steps` (after the last update) it gives the schedule's
    end value: 0 for "constant-decay", `min_lr_ratio` for "cosine".
    """
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant-decay":
        decay_steps = round(cfg.decay_fraction * cfg.steps)
        if decay_steps == 0:
            return warmup
        decay_start = cfg.steps - decay_steps
        # min(): a warm-up that overlaps the decay never raises the LR above the decay line.
        return min(warmup, 1.0 if step < decay_start else (cfg.steps - step) / decay_steps)
    if step < cfg.warmup_steps:
        return warmup
    progress = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def set_lr_multiplier(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
