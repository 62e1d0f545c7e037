"""Synthetic byte-level reasoning tasks where more loops should help, and their accuracy metric.

Each example is ``prompt + answer + "\\n"`` with one fixed layout per task, so every batch
has the same ``seq_len`` and the answer sits at the same positions. Targets are -1 (the
ignore index the models' loss uses) everywhere except on the answer bytes.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from functools import cached_property

import torch
from torch import nn

from loopdiag.data.corpus import unigram_loss
from loopdiag.detect.base import is_int

IGNORE_INDEX = -1
NODE_LETTERS = string.ascii_lowercase
# Examples behind a task's context-free loss: the plug-in entropy is low by about
# (answers − 1) / (2 × examples) per position, 1e-3 nats for 10 answers.
CONTEXT_FREE_EXAMPLES = 4096


class SyntheticTask(ABC):
    """A task generates (prompt, answer) strings; the base turns them into (x, y) batches."""

    kind: str  # the registry key in `TASKS`
    name: str
    prompt_len: int
    answer_len: int

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> list[tuple[str, str]]:
        """``batch_size`` (prompt, answer) pairs of ``prompt_len`` and ``answer_len`` chars."""

    @property
    def seq_len(self) -> int:
        # The trailing newline is only ever a target, never an input.
        return self.prompt_len + self.answer_len

    def batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, seq_len) int64 tokens; ``y`` next-token targets, -1 off the answer."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        examples = self.sample(batch_size, generator)
        texts = [list((prompt + answer + "\n").encode("ascii")) for prompt, answer in examples]
        tokens = torch.tensor(texts, dtype=torch.long)  # (B, seq_len + 1)
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        # y[t] predicts byte t + 1, so an answer byte at position p is the target at p - 1.
        is_answer = torch.zeros(self.seq_len, dtype=torch.bool)
        is_answer[[position - 1 for position in self.answer_positions]] = True
        y[:, ~is_answer] = IGNORE_INDEX
        return x.contiguous(), y

    @property
    def answer_positions(self) -> list[int]:
        """Where the scored bytes sit in ``prompt + answer``: the answer, unless a task
        interleaves several answers with its prompt."""
        return list(range(self.prompt_len, self.prompt_len + self.answer_len))

    @cached_property
    def context_free_loss(self) -> float:
        """The loss of the best prediction that reads no input: at each scored position the
        entropy (nats) of the answer byte there, averaged over positions; estimated from
        `CONTEXT_FREE_EXAMPLES` examples of a fixed seed."""
        _, y = self.batch(CONTEXT_FREE_EXAMPLES, torch.Generator().manual_seed(0))
        return unigram_loss(y, by_position=True)

    def describe(self) -> dict:
        return {"task": self.kind, "name": self.name, "seq_len": self.seq_len, **asdict(self),
                "context_free_loss": self.context_free_loss}


@dataclass(frozen=True)
class AdditionTask(SyntheticTask):
    """``"123+456="``, the sum's digits least-significant first (``"9750"``), then ``"\\n"``.

    Operands and answer are zero-padded to fixed widths so every digit keeps one position
    in every example (a fixed ``seq_len``, and digit i is always in the same place). The
    answer is reversed so that carries flow left to right, the causal direction: each
    digit needs only the operand digits and the carry out of the digit just before it.
    """

    kind = "addition"
    n_digits: int = 3

    def __post_init__(self) -> None:
        if not is_int(self.n_digits) or self.n_digits < 1:
            raise ValueError(f"n_digits must be an int >= 1, got {self.n_digits!r}")

    @property
    def name(self) -> str:
        return f"addition_{self.n_digits}d"

    @property
    def prompt_len(self) -> int:
        return 2 * self.n_digits + 2

    @property
    def answer_len(self) -> int:
        return self.n_digits + 1

    def sample(self, batch_size: int, generator: torch.Generator) -> list[tuple[str, str]]:
        # Digits drawn one by one: uniform operands of any width, beyond int64's range too.
        digits = torch.randint(10, (batch_size, 2, self.n_digits), generator=generator).tolist()
        pairs = []
        for row in digits:
            a, b = ("".join(map(str, operand)) for operand in row)
            total = str(int(a) + int(b)).zfill(self.answer_len)
            pairs.append((f"{a}+{b}=", total[::-1]))
        return pairs


@dataclass(frozen=True)
class PointerChasingTask(SyntheticTask):
    """A random cycle through ``n_nodes`` letters as shuffled pairs, a start node, and the
    node ``hops`` steps away as the answer.

    With ``hops=2``: ``"ca ab bc|a>"`` then ``"c"`` (a → b → c), then ``"\\n"``. One cycle
    through every node gives each exactly one successor and one predecessor, so no node is a
    likelier answer than another; shuffling the pairs makes each lookup by content, not by
    position. ``hops`` is at most half of ``n_nodes``: in a shorter cycle (or a permutation
    with short cycles) the walk wraps round, and ``h`` hops forward would be ``n − h`` hops
    backward or land on the start node, a shortcut shallower than the depth ``h`` asks for.

    ``hops`` may also be a list of hop counts (each at most 9): every example draws one and
    the prompt names it after the start node, ``"ca ab bc|a2>"``. One model then trains on
    every depth at once and `at_hops` scores it per depth in the same layout.

    ``queries`` > 1 asks several questions of one graph, each with its own start (all
    different) and, with a list of hops, its own depth: ``"ca ab bc|a2>c b1>c"``. Every
    answer is a target, so one sequence gives ``queries`` answers of supervision where a
    single query gives one. A later query may lean on earlier answers (a shortcut a
    first query lacks), so `at_hops` keeps only the first query, which sits where it does in
    training: accuracy is then per first query, never all-or-none over several.
    """

    kind = "pointer-chasing"
    n_nodes: int = 8
    hops: int | tuple[int, ...] = 3
    queries: int = 1

    def __post_init__(self) -> None:
        if not is_int(self.n_nodes) or not 2 <= self.n_nodes <= len(NODE_LETTERS):
            raise ValueError(f"n_nodes must be an int in [2, {len(NODE_LETTERS)}], got {self.n_nodes!r}")
        if not is_int(self.queries) or not 1 <= self.queries <= self.n_nodes:
            raise ValueError(f"queries must be in [1, n_nodes={self.n_nodes}] (each asks from "
                             f"another start), got {self.queries!r}")
        if isinstance(self.hops, (list, tuple)):
            hops = tuple(self.hops)
            if not hops or any(not is_int(h) or not 1 <= h <= 9 for h in hops):
                raise ValueError(f"a list of hops must hold hop counts in [1, 9], got {list(hops)}")
            object.__setattr__(self, "hops", hops)  # a TOML or JSON list becomes a tuple
        elif not is_int(self.hops) or self.hops < 1:
            raise ValueError(f"hops must be an int >= 1 or a list of them, got {self.hops!r}")
        if 2 * max(self.hop_choices) > self.n_nodes:
            raise ValueError(f"hops ({max(self.hop_choices)}) must be at most n_nodes / 2 "
                             f"({self.n_nodes // 2}), or walking backward is a shortcut")

    @property
    def names_hops(self) -> bool:
        return isinstance(self.hops, tuple)

    @property
    def hop_choices(self) -> tuple[int, ...]:
        return self.hops if isinstance(self.hops, tuple) else (self.hops,)

    def at_hops(self, hops: int) -> PointerChasingTask:
        """The same layout with every example at ``hops`` hops (for per-depth accuracy)."""
        return PointerChasingTask(self.n_nodes, (hops,) if self.names_hops else hops)

    @property
    def name(self) -> str:
        many = f"_{self.queries}q" if self.queries > 1 else ""
        return f"pointer_{self.n_nodes}n_{'-'.join(map(str, self.hop_choices))}h{many}"

    @property
    def _query_len(self) -> int:
        return 2 + self.names_hops  # "s>" or "sH>"

    @property
    def prompt_len(self) -> int:
        # "xy " pairs without the last space and "|", then the queries, each answered and
        # followed by a space but the last: "s>" (or "sH>" when the prompt names H).
        return 3 * self.n_nodes + self.queries * self._query_len + 2 * (self.queries - 1)

    @property
    def answer_positions(self) -> list[int]:
        first = 3 * self.n_nodes + self._query_len
        return [first + query * (self._query_len + 2) for query in range(self.queries)]

    @property
    def answer_len(self) -> int:
        return 1

    def sample(self, batch_size: int, generator: torch.Generator) -> list[tuple[str, str]]:
        choices = self.hop_choices
        pairs = []
        for _ in range(batch_size):
            cycle = torch.randperm(self.n_nodes, generator=generator).tolist()
            successor = [0] * self.n_nodes
            for position, node in enumerate(cycle):
                successor[node] = cycle[(position + 1) % self.n_nodes]
            order = torch.randperm(self.n_nodes, generator=generator).tolist()
            edges = " ".join(NODE_LETTERS[i] + NODE_LETTERS[successor[i]] for i in order)
            if self.queries == 1:  # one draw, so single-query streams stay as they were
                starts = [int(torch.randint(self.n_nodes, (1,), generator=generator))]
            else:
                starts = torch.randperm(self.n_nodes, generator=generator)[:self.queries].tolist()
            asked = []
            for start in starts:
                hops = choices[0]
                if len(choices) > 1:
                    hops = choices[int(torch.randint(len(choices), (1,), generator=generator))]
                node = start
                for _ in range(hops):
                    node = successor[node]
                named = str(hops) if self.names_hops else ""
                asked.append((f"{NODE_LETTERS[start]}{named}>", NODE_LETTERS[node]))
            earlier = "".join(f"{query}{answer} " for query, answer in asked[:-1])
            pairs.append((f"{edges}|{earlier}{asked[-1][0]}", asked[-1][1]))
        return pairs


TASKS: dict[str, type[SyntheticTask]] = {task.kind: task for task in (AdditionTask, PointerChasingTask)}


def task_from_description(description: dict) -> SyntheticTask:
    """Rebuild a task from `describe()`'s output (a run's recorded config)."""
    cls = TASKS[description["task"]]
    return cls(**{f.name: description[f.name] for f in fields(cls)})


def exact_match_accuracy(
    model: nn.Module,
    task: SyntheticTask,
    n_examples: int = 256,
    n_loops: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> float:
    """Fraction of ``n_examples`` whose answer bytes are all the argmax of the model's logits.

    The examples come from a generator seeded with ``seed``, so every call sees the same ones.
    ``model(x, targets=None[, n_loops=K])`` must return ``(logits (B, T, 256), loss)``.
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError(
            f"n_examples and batch_size must be positive, got {n_examples}, {batch_size}"
        )
    generator = torch.Generator().manual_seed(seed)
    loop_kwargs = {} if n_loops is None else {"n_loops": n_loops}
    first_param = next(model.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    n_correct = 0
    try:
        with torch.no_grad():
            for start in range(0, n_examples, batch_size):
                x, y = task.batch(min(batch_size, n_examples - start), generator)
                logits, _ = model(x.to(device), targets=None, **loop_kwargs)
                predicted = logits.argmax(dim=-1).cpu()
                # Teacher forcing feeds the true earlier answer bytes; when every answer byte
                # is right those are exactly what greedy decoding would have fed, so "all
                # correct" here is the same verdict as greedy decoding of the answer.
                all_right = ((predicted == y) | (y == IGNORE_INDEX)).all(dim=1)
                n_correct += int(all_right.sum())
    finally:
        model.train(was_training)
    return n_correct / n_examples
