"""A study of a looped model loopdiag did not build: a user's decoder made of PyTorch's own
`nn.TransformerEncoderLayer`, recorded through the public API (`loopdiag.RunSession`,
`loop_module=` naming the reused layer), written as a suite folder the detection benchmark
scores like any study (`detection.STUDIES`).

    python benchmarks/user_model.py FILE [FILE ...] --out DIR [--seeds 168 169] [--jobs 2]

The architectures, one layer per loop (by default d_model 64 in 4 heads), a causal mask,
learned positions, GELU and no dropout (`--activation relu --dropout 0.1` are the layer's
own defaults), the output tied to the embedding. Tokens are bytes, or with `--vocab N` the
ids of a byte-level BPE of N tokens trained on the study's text (Hugging Face
`tokenizers`), a user's subword vocabulary:
- `standard`: K distinct pre-LN layers (the non-looped model; recorded at an identity
  after each layer, as a user marks depth on a model with no reused module);
- `looped`: one pre-LN layer run K times;
- `looped-postln`: one post-LN layer run K times (the layer's default, BERT's and ALBERT's);
- `looped-inject`: one pre-LN layer run K times, the embedded input added before every loop
  after the first.
Every run of a seed sees the same batches (byte windows of the files, read in order and
cut at `--max-bytes`); AdamW (β 0.9, 0.95, no weight decay), a learning rate constant or
decayed by a cosine to a tenth after an optional linear warm-up, the gradient clipped to
norm 1. A run whose folder holds `summary.json` is not trained again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import math
import multiprocessing
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loopdiag
from loopdiag.store import write_suite_manifest

ARCHS = ("standard", "looped", "looped-postln", "looped-inject")
VOCAB = 256  # bytes
SCHEDULES = ("constant", "cosine")
ACTIVATIONS = ("gelu", "relu")
MIN_LR_RATIO = 0.1  # where the cosine ends


class UserLoopedLM(nn.Module):
    """A causal byte-level language model whose depth is `n_loops` applications of
    `nn.TransformerEncoderLayer`: distinct layers (`standard`) or one reused layer."""

    def __init__(self, arch: str, n_loops: int, d_model: int, n_heads: int, seq_len: int, *,
                 dropout: float = 0.0, activation: str = "gelu", vocab: int = VOCAB):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        self.arch, self.n_loops = arch, n_loops
        self.embed = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.empty(seq_len, d_model))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

        def layer(norm_first: bool) -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout,
                                              activation=activation, batch_first=True, norm_first=norm_first)

        if arch == "standard":
            self.layers = nn.ModuleList(layer(True) for _ in range(n_loops))
            self.depth_out = nn.Identity()
        else:
            self.block = layer(norm_first=arch != "looped-postln")
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    @property
    def loop_module(self) -> str:
        """The module that runs once per loop, for `loop_module=`."""
        return "depth_out" if self.arch == "standard" else "block"

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        mask = self.mask[:length, :length]
        embedded = self.embed(tokens) + self.positions[:length]
        hidden = embedded
        for loop in range(self.n_loops):
            if self.arch == "standard":
                hidden = self.depth_out(self.layers[loop](hidden, src_mask=mask, is_causal=True))
                continue
            if self.arch == "looped-inject" and loop > 0:
                hidden = hidden + embedded
            hidden = self.block(hidden, src_mask=mask, is_causal=True)
        return self.norm(hidden) @ self.embed.weight.T


@dataclass(frozen=True)
class ByteStudy:
    """What every byte-level study trains on and at what size."""
    files: tuple[Path, ...]
    max_bytes: int
    steps: int
    batch_size: int
    seq_len: int
    d_model: int
    n_heads: int

    def data(self) -> tuple[Tensor, dict[str, Any]]:
        return training_bytes(self.files, self.max_bytes, self.seq_len)


@dataclass(frozen=True)
class Study(ByteStudy):
    schedule: str = "constant"
    warmup_steps: int = 0
    dropout: float = 0.0
    activation: str = "gelu"
    vocab: int = VOCAB

    def data(self) -> tuple[Tensor, dict[str, Any]]:
        if self.vocab == VOCAB:
            return super().data()
        return bpe_tokens(self.files, self.max_bytes, self.seq_len, self.vocab)

    def model(self, cell: Cell) -> UserLoopedLM:
        return UserLoopedLM(cell.arch, cell.n_loops, self.d_model, self.n_heads, self.seq_len,
                            dropout=self.dropout, activation=self.activation, vocab=self.vocab)

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step `step` (from 1), as a share of the peak: a
        linear warm-up over `warmup_steps`, then constant or a cosine to a tenth."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def training_bytes(files: Sequence[Path], max_bytes: int, seq_len: int) -> tuple[Tensor, dict[str, Any]]:
    """The files' bytes, read in order and cut at `max_bytes`, and their description for
    config.json."""
    raw = joined_bytes(files, max_bytes, seq_len)
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return tokens, {**text_description(files, raw), "context_free_loss": loopdiag.unigram_loss(tokens)}


def joined_bytes(files: Sequence[Path], max_bytes: int, seq_len: int) -> bytes:
    raw = b"".join(path.read_bytes() for path in files)[:max_bytes]
    if len(raw) <= seq_len:
        raise ValueError(f"the files hold {len(raw)} bytes, fewer than a window of {seq_len + 1}")
    return raw


def text_description(files: Sequence[Path], raw: bytes) -> dict[str, Any]:
    return {"source": ", ".join(str(path) for path in files), "n_bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest()}


@functools.cache  # every run of a worker trains on the same ids: the tokenizer is trained once
def bpe_tokens(files: tuple[Path, ...], max_bytes: int, seq_len: int, vocab: int) -> tuple[Tensor, dict[str, Any]]:
    """The files' text, read as `joined_bytes` reads it, as the ids of a byte-level BPE of
    `vocab` tokens trained on it (GPT-2's scheme: every byte is a token before the merges,
    so no text is out of vocabulary), and its description. The tokenizer trains the same
    ids every time; `tokens_sha256` lets two runs show they saw the same ones."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError as error:
        raise ValueError("--vocab needs Hugging Face's tokenizers: pip install 'loopdiag[hf]'") from error
    raw = joined_bytes(files, max_bytes, seq_len)
    text = raw.decode("utf-8", errors="replace")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if tokenizer.get_vocab_size() != vocab:
        raise ValueError(f"the text has too few distinct pieces for a vocabulary of {vocab}: its BPE "
                         f"stops at {tokenizer.get_vocab_size()} tokens")
    ids = tokenizer.encode(text).ids
    if len(ids) <= seq_len:
        raise ValueError(f"the files hold {len(ids)} tokens of the BPE, fewer than a window of {seq_len + 1}")
    tokens = torch.tensor(ids)
    return tokens, {**text_description(files, raw), "tokenizer": "byte-level BPE (Hugging Face tokenizers)",
                    "vocab_size": vocab, "n_tokens": len(ids),
                    "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                    "context_free_loss": loopdiag.unigram_loss(tokens)}


@dataclass(frozen=True)
class Cell:
    arch: str
    n_loops: int
    seed: int
    lr: float

    @property
    def run_id(self) -> str:
        return f"{self.arch}-k{self.n_loops:02d}-s{self.seed}-lr{self.lr:g}"

    def cell_keys(self) -> dict[str, Any]:
        return {"arch": self.arch, "n_loops": self.n_loops, "seed": self.seed, "lr": self.lr}


def config_of(study: Study, cell: Cell, model: UserLoopedLM, data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": cell.run_id, "cell": cell.cell_keys(),
        "model": {"kind": "benchmarks/user_model.py:UserLoopedLM", "arch": cell.arch, "n_loops": cell.n_loops,
                  "block": "torch.nn.TransformerEncoderLayer", "d_model": study.d_model,
                  "n_heads": study.n_heads, "n_layers": 1, "seq_len": study.seq_len, "vocab_size": study.vocab,
                  "dropout": study.dropout, "activation": study.activation,
                  "n_params": sum(p.numel() for p in model.parameters())},
        "train": {"steps": study.steps, "batch_size": study.batch_size, "lr": cell.lr, "optimizer": "adamw",
                  "betas": [0.9, 0.95], "weight_decay": 0.0, "schedule": study.schedule,
                  "warmup_steps": study.warmup_steps, "min_lr_ratio": MIN_LR_RATIO,
                  "grad_clip": 1.0, "seed": cell.seed},
        "probes": {"log_every": 1, "loop_module": model.loop_module},
        "data": dict(data),
    }


def train_run(study: Study, cell: Cell, out: Path) -> float:
    """Train one cell into `out / run_id`; its wall time in seconds."""
    start = time.perf_counter()
    tokens, data = study.data()
    torch.manual_seed(cell.seed)
    model = study.model(cell)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cell.lr, betas=(0.9, 0.95), weight_decay=0.0)
    # LambdaLR counts from 0: step s trains at the factor of s + 1
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: study.lr_factor(done + 1))
    batches = torch.Generator().manual_seed(cell.seed)  # the same windows for every run of a seed
    monitor = loopdiag.Monitor(context_free_loss=data["context_free_loss"])
    with loopdiag.RunSession(model, loop_module=model.loop_module, monitor=monitor,
                             run_dir=out / cell.run_id, config=config_of(study, cell, model, data)) as run:
        for step in range(1, study.steps + 1):
            starts = torch.randint(len(tokens) - study.seq_len, (study.batch_size,), generator=batches)
            windows = torch.stack([tokens[at:at + study.seq_len + 1] for at in starts.tolist()])
            logits = model(windows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))
            loss.backward()
            run.after_backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            run.step(step, loss=loss, lr=lr)
    return time.perf_counter() - start


def trained(study: Any, cells: Sequence[Cell], out: Path, jobs: int,
            train: Callable[[Any, Cell, Path], float]) -> Iterator[tuple[Cell, float]]:
    """`train(study, cell, out)` for each of `cells` on `jobs` processes of one thread each
    (one job: in this process); each cell with its wall time, in order."""
    if jobs == 1:
        yield from ((cell, train(study, cell, out)) for cell in cells)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from zip(cells, pool.map(train, itertools.repeat(study), cells, itertools.repeat(out)))


def grid(archs: Sequence[str], loops: Sequence[int], lrs: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    return [Cell(arch, n_loops, seed, lr) for arch, n_loops, seed, lr in itertools.product(archs, loops, seeds, lrs)]


def study_parser(doc: str, archs: Sequence[str], *, name: str, lrs: Sequence[float], seeds: Sequence[int],
                 steps: int) -> argparse.ArgumentParser:
    """The options every byte-level study script takes; `doc`'s first paragraph describes it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="text to train on, read in order")
    parser.add_argument("--out", type=Path, required=True, help="the suite folder to write")
    parser.add_argument("--name", default=name)
    parser.add_argument("--archs", nargs="+", default=list(archs), choices=archs)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(lrs))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--max-bytes", type=int, default=500_000)
    parser.add_argument("--jobs", type=int, default=2)
    return parser


def check_study_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` on bad values of `study_parser`'s options."""
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    for name in ("steps", "batch_size", "seq_len", "d_model", "n_heads", "max_bytes", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(k < 1 for k in args.loops) or any(not lr > 0 for lr in args.lrs):
        parser.error("--loops must be >= 1 and --lrs > 0")
    if args.d_model % args.n_heads:
        parser.error(f"--d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")


def run_study(parser: argparse.ArgumentParser, args: argparse.Namespace, study: Any, spec: Mapping[str, Any],
              train: Callable[[Any, Cell, Path], float]) -> None:
    """Check that `study` reads its text (`parser.error` if not), write the suite manifest
    (the parser's description, `spec` and the grid of `args`) and train every cell not yet
    finished, with progress."""
    try:
        study.data()  # bad input fails here, not in every worker
    except ValueError as error:
        parser.error(str(error))
    cells = grid(args.archs, args.loops, args.lrs, args.seeds)
    spec = {"name": args.name, "description": parser.description.replace("\n", " "), **spec,
            "archs": args.archs, "loops": args.loops, "lrs": args.lrs, "seeds": args.seeds,
            "steps": args.steps, "log_every": 1}
    write_suite_manifest(args.out, spec, {cell.run_id: cell.cell_keys() for cell in cells})
    todo = [cell for cell in cells if not (args.out / cell.run_id / "summary.json").is_file()]
    print(f"{len(cells) - len(todo)} of {len(cells)} runs already done; training {len(todo)}", flush=True)
    start = time.perf_counter()
    for done, (cell, seconds) in enumerate(trained(study, todo, args.out, args.jobs, train), 1):
        print(f"[{done}/{len(todo)}] {cell.run_id}: {seconds:.0f} s", flush=True)
    print(f"trained {len(todo)} runs in {time.perf_counter() - start:.0f} s into {args.out}")


def study_command(script: str, argv: Sequence[str] | None) -> str:
    return shlex.join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])


def main(argv: Sequence[str] | None = None) -> None:
    parser = study_parser(__doc__, ARCHS, name="user-model", lrs=[3e-3, 1e-2, 3e-2], seeds=[168, 169], steps=200)
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="after the warm-up: constant, or a cosine to a tenth of the peak")
    parser.add_argument("--warmup-steps", type=int, default=0, help="a linear warm-up from 0")
    parser.add_argument("--dropout", type=float, default=0.0, help="the layer's dropout (its default: 0.1)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="gelu", help="the layer's own default is relu")
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help=f"{VOCAB}: bytes; more: a byte-level BPE of that many tokens trained on the text")
    args = parser.parse_args(argv)
    check_study_args(parser, args)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must lie in [0, --steps), got {args.warmup_steps}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.vocab < VOCAB:
        parser.error(f"--vocab must be at least {VOCAB} (the bytes a byte-level BPE starts from), got {args.vocab}")
    study = Study(tuple(args.files), args.max_bytes, args.steps, args.batch_size, args.seq_len,
                  args.d_model, args.n_heads, args.schedule, args.warmup_steps, args.dropout, args.activation,
                  args.vocab)
    spec = {"command": study_command("user_model.py", argv), "schedule": args.schedule,
            "warmup_steps": args.warmup_steps, "vocab": args.vocab}
    run_study(parser, args, study, spec, train_run)


if __name__ == "__main__":
    main()
