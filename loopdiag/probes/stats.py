"""The statistics: reductions done on the device inside hooks (0-d tensors, no activations
kept), and the host arithmetic that turns their synced sums into recorded values.

Hot-path reductions return sums rather than means and leave every scalar division to the
host: on CPU each tiny tensor op costs microseconds, and a K-loop model runs them K times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.linalg import vector_norm

from loopdiag.models.layers import Attention, norm

LoopSums = dict[str, Tensor | int | None]

# How each per-loop sum (those of `reduce_loop_output`, and the recorder's `act_grad`)
# becomes the global batch's under data parallelism; `records.reduce_over_ranks` applies it.
#   sum        added over the ranks
#   norm       a Euclidean norm over rows: the squares are added, then the root taken
#   mean_norm  the norm of a gradient of the loss averaged over ranks: `norm` / world size
LOOP_SUMS_OVER_RANKS = {"norm_sum": "sum", "unit_deviation_norm": "norm", "tokens": "sum", "sequences": "sum",
                        "rel_sum": "sum", "act_grad": "mean_norm"}


@dataclass(frozen=True)
class PackedSequences:
    """Where each token of a packed row (1, N) belongs: sequences laid end to end, each
    restarting its position ids (Hugging Face's `DataCollatorWithFlattening`). Device
    tensors, so reading them costs no sync."""

    ids: Tensor  # (N,) the index of each token's sequence, 0 .. count − 1
    count: Tensor  # 0-d: how many sequences
    lengths: Tensor  # (N,) tokens of sequence i at i, zero past `count`

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> PackedSequences:
        """A sequence starts wherever a position id is no greater than the one before it."""
        positions = position_ids.reshape(-1)
        starts = positions[1:] <= positions[:-1]
        ids = torch.cat([starts.new_zeros(1, dtype=torch.long), starts.cumsum(0)])
        lengths = torch.zeros_like(ids).index_add_(0, ids, torch.ones_like(ids))
        return cls(ids=ids, count=ids[-1] + 1, lengths=lengths)

    def to(self, device: torch.device) -> PackedSequences:
        """On `device` (a model may keep its position ids where its hidden state is not)."""
        return PackedSequences(*(tensor.to(device) for tensor in (self.ids, self.count, self.lengths)))


def as_sequences(x: Tensor, rows: Sequence[tuple[int, int]] = ()) -> Tensor:
    """(..., T, d) -> (B, T, d), detached: the last dim is features, the one before it
    tokens, everything earlier is batch. A 2-D output is one sequence (T, d), or, where it
    has B·T rows for the first (B, T) of the root inputs' `rows` with B > 1, the B
    sequences flattened (B·T, d)."""
    x = x.detach()
    if x.dim() == 2:
        batch = next(((b, t) for b, t in rows if b > 1 and b * t == x.size(0)), None)
        if batch is not None:
            return x.view(*batch, x.size(-1))
    return x if x.dim() == 3 else x.reshape(-1, x.size(-2), x.size(-1))


def reduce_loop_output(seqs: Tensor, prev: Tensor | None, packed: PackedSequences | None = None) -> LoopSums:
    """Sums behind `resid_norm`, `rel_update` and `token_corr` for one loop's output `seqs`
    (B, T, d); `prev` is the previous loop's output in the same forward, or None; `packed`
    splits a (1, N, d) output into its sequences. A new sum also needs its rule in
    `LOOP_SUMS_OVER_RANKS` and its host value in `finish_loop`."""
    norms = vector_norm(seqs, dim=-1, dtype=torch.float32)  # (B, T)
    inverse = norms.reciprocal()
    weights = inverse.unsqueeze(-1).to(seqs.dtype)  # (B, T, 1)
    # Each unit vector's deviation from its sequence's mean unit vector, token by token:
    # read from the sum of the units alone, 1 − token_corr of identical tokens is float32
    # rounding that grows with the context (up to 9e-6 at 2k tokens, 8e-5 at 8k, past the
    # collapse threshold).
    if packed is None:
        # (B, 1, T) @ (B, T, d) -> (B, 1, d): the mean unit token vector of each sequence
        mean_unit = torch.bmm(weights.transpose(1, 2), seqs) / seqs.size(1)
        deviations = torch.addcmul(-mean_unit, seqs, weights)
        sequences: Tensor | int = seqs.size(0)
    else:
        units = seqs[0] * weights[0]  # (N, d)
        # one row per possible sequence (N at most): their count is on the device; in place,
        # three (N, d) buffers at most
        means = torch.zeros_like(units).index_add_(0, packed.ids, units)
        means /= packed.lengths.clamp(min=1).unsqueeze(-1).to(units.dtype)
        deviations = units.sub_(means.index_select(0, packed.ids))
        sequences = packed.count
    sums: LoopSums = {
        "norm_sum": norms.sum(),
        "unit_deviation_norm": vector_norm(deviations, dtype=torch.float32),
        "tokens": norms.numel(),
        "sequences": sequences,
    }
    if prev is not None and prev.shape == seqs.shape:
        step = vector_norm(seqs - prev, dim=-1, dtype=torch.float32)
        sums["rel_sum"] = torch.dot(step.flatten(), inverse.flatten())
    return sums


def finish_loop(sums: dict[str, float | int | None]) -> dict[str, float]:
    """Host side of `reduce_loop_output` (values already synced). `act_grad_norm` is NaN
    when the loop's output needed a gradient that never arrived; absent when it needed none."""
    tokens, sequences = sums["tokens"], sums["sequences"]
    # Mean off-diagonal cosine of the token Gram, per sequence: with u_i the unit vectors
    # and m their mean, sum_i |u_i - m|^2 = (T - 1)(1 - mean cosine); summed over the
    # sequences, (tokens − sequences)(1 − mean cosine), each sequence weighted by T − 1.
    token_corr = (1 - sums["unit_deviation_norm"] ** 2 / (tokens - sequences)
                  if tokens > sequences else math.nan)
    stats = {
        "resid_norm": sums["norm_sum"] / tokens,
        "rel_update": sums["rel_sum"] / tokens if "rel_sum" in sums else math.nan,
        "token_corr": token_corr,
    }
    if "act_grad" in sums:
        stats["act_grad_norm"] = math.nan if sums["act_grad"] is None else sums["act_grad"]
    return stats


@torch.no_grad()
def attention_stats(attn: Attention, x: Tensor, query_source: Tensor | None) -> tuple[Tensor, Tensor]:
    """(mean entropy in nats over batch, heads and queries; max pre-softmax logit) of one call
    of our `Attention`, recomputed from its own weights exactly as its forward does."""
    batch, seq_len, _ = x.shape
    split = (batch, seq_len, attn.n_heads, attn.head_dim)
    q = attn.c_q(x if query_source is None else query_source).view(split)
    k = attn.c_k(x).view(split)
    q, k = attn.rotary(q), attn.rotary(k)
    if attn.qk_norm:
        q, k = norm(q), norm(k)
    # (B, H, T, D) @ (B, H, D, T) -> (B, H, T, T), scaled as SDPA does by default
    logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * attn.head_dim**-0.5
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).triu(1)
    logits = logits.masked_fill(future, -math.inf)
    entropy = torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1).mean()
    return entropy.float(), logits.amax().float()


def oscillation_sums(grad: Tensor, prev: Tensor) -> dict[str, Tensor]:
    """Device terms of `grad_cos` and `sign_flip` between two flattened gradients.

    With s = sign(grad) * sign(prev) in {-1, 0, +1}: sum(s) = kept - flipped and
    sum(s^2) = kept + flipped (coordinates that are exactly 0 in either drop out). Two
    float reductions cost a third of counting with comparisons; they are exact integers
    up to 2^24 coordinates and within float32 rounding beyond.
    """
    signs = torch.sign(grad) * torch.sign(prev)
    return {"dot": torch.dot(grad, prev), "sign_sum": signs.sum(), "nonzero": torch.dot(signs, signs)}


def sign_flip_fraction(sign_sum: float, nonzero: float) -> float:
    return safe_div((nonzero - sign_sum) / 2, nonzero)


def window_stats(norms: Sequence[float]) -> tuple[float, float]:
    """(`gnorm_cv`, `gnorm_autocorr`) of a gradient-norm series.

    The coefficient of variation is of the norms themselves (std / mean, population std):
    their increments have mean ~0, so a CV of the increments would divide by noise. The
    lag-1 autocorrelation is of the increments d_i = n_i - n_(i-1), with the usual ACF
    estimator sum_i (d_i - m)(d_(i+1) - m) / sum_i (d_i - m)^2. Independent noise in the
    norms gives -0.5, a smooth trend gives positive values, and a norm that zig-zags step
    to step (increments of alternating sign) goes towards -1.
    """
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((n - mean) ** 2 for n in norms) / len(norms))
    increments = [b - a for a, b in zip(norms, norms[1:])]
    mean_increment = sum(increments) / len(increments)
    centred = [d - mean_increment for d in increments]
    lagged = sum(a * b for a, b in zip(centred, centred[1:]))
    return safe_div(std, mean), safe_div(lagged, sum(c * c for c in centred))


def safe_div(numerator: float, denominator: float) -> float:
    """Float division that yields NaN / +-inf instead of raising on a zero denominator."""
    if denominator != 0:
        return numerator / denominator
    if numerator == 0 or math.isnan(numerator):
        return math.nan
    return math.copysign(math.inf, numerator)


def group_name(param_name: str) -> str:
    """The `grad_norm/<group>` a parameter belongs to: its module path up to the component
    after the last integer index (`blocks.0.attn.c_q.weight` -> `blocks.0.attn`,
    `encoder.layer.3.attention.self.query.weight` -> `encoder.layer.3.attention`), or the
    first two components of the path when it has no index (`block.self_attn.out_proj.weight`
    -> `block.self_attn`, `wte.weight` -> `wte`)."""
    parts = param_name.split(".")
    module_path = parts[:-1] or parts  # a parameter held by the root model is its own group
    indices = [i for i, part in enumerate(module_path) if part.isdigit()]
    keep = indices[-1] + 2 if indices else 2
    return ".".join(module_path[:keep])
