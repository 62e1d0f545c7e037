"""Parts shared by every model family: parameter-free RMSNorm, rotary positions, attention
whose queries may come from another stream (attention injection), the pre-norm block, the
hook point, and the base class that owns embedding, read-out and loss."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loopdiag.models.config import ModelConfig


def norm(x: torch.Tensor) -> torch.Tensor:
    """N(.): RMSNorm without a gain, so the FLT changes stay exactly parameter-free."""
    return F.rms_norm(x, (x.size(-1),))


class HookPoint(nn.Identity):
    """A no-op at a place worth probing: a forward hook on it sees (and may replace) the tensor.

    Models call `loop_out` once at the end of every loop, so its hook fires once per loop.
    """


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # (1, T, 1, head_dim/2): broadcasts over batch and heads of a (B, T, H, D) tensor
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len, half = x.size(1), x.size(-1) // 2
        cos, sin = self.cos[:, :seq_len].to(x.dtype), self.sin[:, :seq_len].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.qk_norm = cfg.n_heads, cfg.head_dim, cfg.qk_norm
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len)
        self.c_q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, query_source: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over `x`; with `query_source`, queries come from it instead
        (keys and values still from `x`). Both inputs are already normalised."""
        batch, seq_len, d_model = x.shape
        split = (batch, seq_len, self.n_heads, self.head_dim)
        q = self.c_q(x if query_source is None else query_source).view(split)
        k, v = self.c_k(x).view(split), self.c_v(x).view(split)
        q, k = self.rotary(q), self.rotary(k)
        if self.qk_norm:
            q, k = norm(q), norm(k)
        # (B, T, H, D) -> (B, H, T, D) for SDPA, and back
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq_len, d_model))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2, as in the official FLT code


class Block(nn.Module):
    """Pre-norm block. With `query_source` (attention injection), the attention's queries
    come from it and its keys/values from N(x), through this block's own W_Q, W_K, W_V, W_O.
    `query_source` must already be normalised (h^(t-1) = N(x_L^(t-1)) is): normalising it
    once per loop instead of once per block keeps FLT's step time equal to LT's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, query_source: torch.Tensor | None = None, branch_scale: float = 1.0
    ) -> torch.Tensor:
        x = x + branch_scale * self.attn(norm(x), query_source)
        return x + branch_scale * self.mlp(norm(x))


class LoopedLM(nn.Module):
    """Embedding, read-out and loss shared by all families; each subclass writes its loop.

    forward(idx, targets=None, n_loops=None) -> (logits, loss): idx (B, T) int64 byte tokens,
    targets (B, T) with -1 ignored, n_loops overrides the configured K for this call.
    """

    arch: str = ""
    variants: tuple[str, ...] = ()  # the architectures one class builds, each passed as `arch`
    fixed_depth = False  # True: the loop count is fixed at build time (no test-time scaling)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.loop_out = HookPoint()

    def make_blocks(self, n: int) -> nn.ModuleList:
        return nn.ModuleList(Block(self.config) for _ in range(n))

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-uniform predictions at step 0
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                if self.config.zero_init_out:
                    nn.init.zeros_(module.c_proj.weight)
                else:  # keep the residual stream's growth with depth modest
                    module.c_proj.weight.data.mul_(1 / math.sqrt(2 * self.config.n_layers))

    def resolve_loops(self, n_loops: int | None) -> int:
        loops = self.config.n_loops if n_loops is None else n_loops
        if not isinstance(loops, int) or isinstance(loops, bool) or loops < 1:
            raise ValueError(f"n_loops must be a positive integer, got {n_loops!r}")
        return loops

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq_len), got shape {tuple(idx.shape)}")
        if idx.size(1) > self.config.seq_len:
            raise ValueError(f"sequence length {idx.size(1)} exceeds ModelConfig.seq_len={self.config.seq_len}")
        return self.wte(idx)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(norm(x)).float()
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def read_out(
        self, loop_states: list[torch.Tensor], targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the last loop; the loss on the last loop or averaged over every loop."""
        logits = self.logits(loop_states[-1])
        if targets is None:
            return logits, None
        supervised = loop_states if self.config.loss_on == "all" else loop_states[-1:]
        losses = [
            F.cross_entropy(
                (logits if state is loop_states[-1] else self.logits(state)).flatten(0, 1),
                targets.flatten(),
                ignore_index=-1,
            )
            for state in supervised
        ]
        return logits, torch.stack(losses).mean()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the blocks reused every loop (`core` for recurrent-depth); for
        `standard`, which reuses nothing, all its blocks, so probes compare like with like."""
        blocks = self.core if hasattr(self, "core") else self.blocks
        return list(blocks.parameters())
