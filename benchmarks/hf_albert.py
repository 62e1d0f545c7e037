"""A study of a third party's looped model in a third party's training loop: Hugging Face's
ALBERT, whose layer group is shared across depth, trained by `transformers.Trainer` and
recorded by `loopdiag.integrations.huggingface.LoopdiagCallback`, written as a suite folder
the detection benchmark scores like any study (`detection.STUDIES`).

    python benchmarks/hf_albert.py FILE [FILE ...] --out DIR [--seeds 271 272] [--jobs 2]

`transformers.AlbertForMaskedLM` as ALBERT is (post-LN, `gelu_new`, no dropout, an
embedding of half the width projected up, the output tied to it), d_model 64 in 4 heads by
default, trained as a causal byte-level language model: a causal mask passed as the 4-D
`attention_mask`, each position's label the next byte (`benchmarks/user_model.py`'s reading
of the files). The architectures:
- `standard`: K layer groups, one per layer (ALBERT without sharing, BERT's depth); recorded
  at one marker module after each group, as a user marks depth on a model with no module it
  reuses;
- `looped`: one layer group run K times (ALBERT's sharing), recorded at that group.
Every run of a seed sees the same windows in the same order. The Trainer's defaults
otherwise: AdamW (β 0.9, 0.999, no weight decay), the learning rate decayed linearly to 0,
no warm-up, the gradient clipped to norm 1. Subnormal floats are flushed to zero. A run
whose folder holds `summary.json` is not trained again.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from user_model import ByteStudy, Cell, check_study_args, run_study, study_command, study_parser

import loopdiag
from loopdiag.integrations.huggingface import LoopdiagCallback

ARCHS = ("standard", "looped")
VOCAB = 256  # bytes
SHARED_GROUP = "albert.encoder.albert_layer_groups.0"


class DepthMarked(nn.Module):
    """A layer group whose output passes through `marker`, a module shared by every group:
    the one module that runs once per layer of a model that reuses none."""

    def __init__(self, group: nn.Module, marker: nn.Module):
        super().__init__()
        self.group, self.marker = group, marker

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.marker(self.group(hidden_states, *args, **kwargs))


def albert(arch: str, n_loops: int, d_model: int, n_heads: int, seq_len: int) -> transformers.AlbertForMaskedLM:
    """ALBERT of `n_loops` layers: one group per layer (`standard`, recorded at
    `model.depth_out`) or one group run `n_loops` times (`looped`)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    config = transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=d_model // 2, hidden_size=d_model, num_hidden_layers=n_loops,
        num_hidden_groups=n_loops if arch == "standard" else 1, inner_group_num=1,
        num_attention_heads=n_heads, intermediate_size=4 * d_model, max_position_embeddings=seq_len,
        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.AlbertForMaskedLM(config)
    if arch == "standard":
        model.depth_out = nn.Identity()
        groups = model.albert.encoder.albert_layer_groups
        for index, group in enumerate(groups):
            groups[index] = DepthMarked(group, model.depth_out)
    return model


def loop_module(arch: str) -> str:
    return "depth_out" if arch == "standard" else SHARED_GROUP


class NextByteWindows(torch.utils.data.Dataset):
    """`count` byte windows of `tokens` drawn from `seed`: each position predicts the next
    byte and attends to itself and the positions before it (a 4-D `attention_mask`, which
    ALBERT takes as given)."""

    def __init__(self, tokens: Tensor, seq_len: int, count: int, seed: int):
        starts = torch.randint(len(tokens) - seq_len, (count,), generator=torch.Generator().manual_seed(seed))
        self.windows = torch.stack([tokens[at:at + seq_len + 1] for at in starts.tolist()])
        self.causal = torch.ones(1, seq_len, seq_len, dtype=torch.bool).tril()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        window = self.windows[index]
        return {"input_ids": window[:-1], "labels": window[1:], "attention_mask": self.causal}


def config_of(study: ByteStudy, cell: Cell, model: nn.Module, data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": cell.run_id, "cell": cell.cell_keys(),
        "model": {"kind": "transformers.AlbertForMaskedLM", "arch": cell.arch, "n_loops": cell.n_loops,
                  "d_model": study.d_model, "n_heads": study.n_heads, "n_layers": 1, "seq_len": study.seq_len,
                  "embedding_size": study.d_model // 2, "dropout": 0.0, "activation": "gelu_new",
                  "objective": "next byte, causal attention mask",
                  "n_params": sum(p.numel() for p in model.parameters())},
        "train": {"steps": study.steps, "batch_size": study.batch_size, "lr": cell.lr, "optimizer": "adamw",
                  "betas": [0.9, 0.999], "weight_decay": 0.0, "schedule": "linear", "warmup_steps": 0,
                  "grad_clip": 1.0, "seed": cell.seed, "trainer": f"transformers {transformers.__version__}",
                  "flush_denormal": True},
        "probes": {"log_every": 1, "loop_module": loop_module(cell.arch)},
        "data": dict(data),
    }


def train_run(study: ByteStudy, cell: Cell, out: Path) -> float:
    """Train one cell into `out / run_id` with the Trainer; its wall time in seconds."""
    start = time.perf_counter()
    # A collapsed looped model's gradients reach subnormal floats, whose arithmetic is tens of
    # times slower on x86 (a 300-step run would take hours); flushed, they read 0.
    torch.set_flush_denormal(True)
    try:
        train_cell(study, cell, out)
    finally:
        torch.set_flush_denormal(False)  # the default, for what runs next in this process
    return time.perf_counter() - start


def train_cell(study: ByteStudy, cell: Cell, out: Path) -> None:
    tokens, data = study.data()
    windows = NextByteWindows(tokens, study.seq_len, study.steps * study.batch_size, cell.seed)
    torch.manual_seed(cell.seed)
    model = albert(cell.arch, cell.n_loops, study.d_model, study.n_heads, study.seq_len)
    callback = LoopdiagCallback(loop_module=loop_module(cell.arch),
                                monitor=loopdiag.Monitor(context_free_loss=data["context_free_loss"]),
                                run_dir=out / cell.run_id, config=config_of(study, cell, model, data))
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output_dir; nothing is saved
        args = transformers.TrainingArguments(
            output_dir=scratch, max_steps=study.steps, per_device_train_batch_size=study.batch_size,
            learning_rate=cell.lr, seed=cell.seed, save_strategy="no", logging_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model, args, train_dataset=windows, callbacks=[callback])
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()


def main(argv: Sequence[str] | None = None) -> None:
    parser = study_parser(__doc__, ARCHS, name="hf-albert", lrs=[1e-3, 3e-3, 1e-2, 3e-2], seeds=[271, 272],
                          steps=300)
    args = parser.parse_args(argv)
    check_study_args(parser, args)
    if args.d_model % 2:
        parser.error(f"--d-model must be even (the embedding is half of it), got {args.d_model}")
    study = ByteStudy(tuple(args.files), args.max_bytes, args.steps, args.batch_size, args.seq_len,
                      args.d_model, args.n_heads)
    spec = {"command": study_command("hf_albert.py", argv), "schedule": "linear", "warmup_steps": 0}
    run_study(parser, args, study, spec, train_run)


if __name__ == "__main__":
    main()
