import json
import math

import pytest
import torch
from torch import nn

from loopdiag.data import (
    IGNORE_INDEX,
    AdditionTask,
    PointerChasingTask,
    exact_match_accuracy,
)
from loopdiag.store.reference import context_free_loss

TASKS = [
    AdditionTask(1),
    AdditionTask(3),
    AdditionTask(25),
    PointerChasingTask(),
    PointerChasingTask(10, 5),
    PointerChasingTask(16, [1, 2, 4, 8]),
    PointerChasingTask(16, [1, 2, 4, 8], queries=6),
]
TASK_IDS = ["add1", "add3", "add25", "ptr8x3", "ptr10x5", "ptr16xmixed", "ptr16x6queries"]


def decode(row: torch.Tensor) -> str:
    return bytes(row.tolist()).decode("ascii")


class NextByteModel(nn.Module):
    """Stand-in with the models' forward contract; predicts x[t + 1] + offset at position t.

    Under teacher forcing every answer byte is also in the input, so offset 0 is an oracle on
    answer positions and offset 1 is always wrong there.
    """

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.scale = nn.Parameter(torch.ones(()))  # gives the module a device
        self.calls: list[dict] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, idx, targets=None, **kwargs):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(), **kwargs})
        self.inputs.append(idx)
        next_byte = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], ord("\n"))], dim=1)
        logits = nn.functional.one_hot((next_byte + self.offset) % 256, 256).float()
        return logits * self.scale, None


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
def test_batch_shapes_and_fixed_length(task):
    x, y = task.batch(5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, task.seq_len)
    assert x.dtype == y.dtype == torch.int64
    assert json.loads(json.dumps(task.describe()))["seq_len"] == task.seq_len


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
def test_targets_ignored_outside_answer(task):
    x, y = task.batch(16, torch.Generator().manual_seed(1))
    scored = y != IGNORE_INDEX
    assert (scored.sum(dim=1) == len(task.answer_positions)).all()
    # Scored targets are the next input bytes, ending just before the closing newline.
    assert torch.equal(y[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]])
    assert not scored[:, -1].any()


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
def test_batch_is_deterministic_given_generator(task):
    a = task.batch(8, torch.Generator().manual_seed(3))
    b = task.batch(8, torch.Generator().manual_seed(3))
    c = task.batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("n_digits", [1, 3, 25])
def test_addition_answers_are_correct(n_digits):
    task = AdditionTask(n_digits)
    x, y = task.batch(64, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(x, y):
        question, reversed_sum = decode(row_x).split("=")
        a, b = question.split("+")
        assert len(a) == len(b) == n_digits and len(reversed_sum) == n_digits + 1
        assert int(reversed_sum[::-1]) == int(a) + int(b)
        assert decode(row_y[row_y != IGNORE_INDEX]) == reversed_sum


def test_context_free_loss_is_the_answers_entropy_per_position():
    # 1-digit sums, reversed: the ones digit is uniform, the tens digit a carry in 45 of 100
    carry = -(0.45 * math.log(0.45) + 0.55 * math.log(0.55))
    assert AdditionTask(1).context_free_loss == pytest.approx((math.log(10) + carry) / 2, abs=0.01)
    # every node is as likely an answer as another, for each of several queries
    pointer = PointerChasingTask(8, [1, 2, 4], queries=8)
    assert pointer.context_free_loss == pytest.approx(math.log(8), abs=0.01)
    described = json.loads(json.dumps(pointer.describe()))
    assert described["context_free_loss"] == pointer.context_free_loss
    older = {key: value for key, value in described.items() if key != "context_free_loss"}
    assert context_free_loss({"data": older}) == pointer.context_free_loss


def test_addition_covers_carries():
    x, _ = AdditionTask(1).batch(64, torch.Generator().manual_seed(0))
    sums = [int(decode(row).split("=")[1][::-1]) for row in x]
    assert min(sums) < 10 <= max(sums)


@pytest.mark.parametrize("n_nodes, hops", [(8, 3), (4, 2), (26, 1), (26, 13)])
def test_pointer_chasing_answers_follow_the_pointers(n_nodes, hops):
    task = PointerChasingTask(n_nodes, hops)
    x, y = task.batch(32, torch.Generator().manual_seed(0))
    letters = [chr(ord("a") + i) for i in range(n_nodes)]
    for row_x, row_y in zip(x, y):
        edges, query = decode(row_x).split("|")
        start, answer = query.split(">")
        successor = dict(edges.split(" "))
        assert sorted(successor) == sorted(successor.values()) == letters  # a permutation
        node, cycle = start, []
        for _ in range(n_nodes):
            node = successor[node]
            cycle.append(node)
        assert sorted(cycle) == letters  # one cycle through every node: no walk wraps early
        assert answer == cycle[hops - 1] != start
        assert decode(row_y[row_y != IGNORE_INDEX]) == answer


def test_mixed_hops_name_the_depth_and_score_per_depth():
    task = PointerChasingTask(16, [1, 2, 4, 8])
    x, y = task.batch(256, torch.Generator().manual_seed(0))
    seen = set()
    for row_x, row_y in zip(x, y):
        edges, query = decode(row_x).split("|")
        start, hops = query[0], int(query[1])
        successor = dict(edges.split(" "))
        node = start
        for _ in range(hops):
            node = successor[node]
        assert decode(row_y[row_y != IGNORE_INDEX]) == node
        seen.add(hops)
    assert seen == {1, 2, 4, 8}
    deep = task.at_hops(8)
    assert deep.seq_len == task.seq_len
    assert {decode(row).split("|")[1][1] for row in deep.batch(16, torch.Generator())[0]} == {"8"}


def test_several_queries_ask_from_different_starts_and_every_answer_is_a_target():
    task = PointerChasingTask(16, [1, 2, 4, 8], queries=5)
    x, y = task.batch(64, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(x, y):
        edges, asked = decode(row_x).split("|")  # x ends on the last answer
        successor = dict(edges.split(" "))
        expected = ""
        for query in asked.split(" "):
            start, hops, answer = query[0], int(query[1]), query[3]
            node = start
            for _ in range(hops):
                node = successor[node]
            assert query[2] == ">" and answer == node
            expected += answer
        assert len({query[0] for query in asked.split(" ")}) == 5
        assert decode(row_y[row_y != IGNORE_INDEX]) == expected
    first = task.at_hops(4)
    assert first.queries == 1 and first.seq_len < task.seq_len
    # The first query sits where it does in training, so a causal model scores it alike.
    assert decode(first.batch(1, torch.Generator())[0][0]).index("|") == decode(x[0]).index("|")


@pytest.mark.parametrize(
    "make",
    [lambda: AdditionTask(0), lambda: PointerChasingTask(1), lambda: PointerChasingTask(27),
     lambda: PointerChasingTask(8, 0), lambda: PointerChasingTask(8, 5),
     lambda: PointerChasingTask(16, []), lambda: PointerChasingTask(26, [1, 10]),
     lambda: PointerChasingTask(4, 1, queries=5), lambda: PointerChasingTask(4, 1, queries=0)],
    ids=["add0", "ptr1node", "ptr27nodes", "ptr0hops", "ptr-wraps", "ptr-no-hops", "ptr-two-digits",
         "ptr-more-queries-than-starts", "ptr-no-queries"],
)
def test_bad_task_parameters(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: AdditionTask("3"), "n_digits must be an int >= 1, got '3'"),
    (lambda: AdditionTask(True), "n_digits must be an int >= 1, got True"),
    (lambda: PointerChasingTask(8.0), "n_nodes must be an int in [2, 26], got 8.0"),
    (lambda: PointerChasingTask(8, "3"), "hops must be an int >= 1 or a list of them, got '3'"),
], ids=["add-str", "add-bool", "ptr-float-nodes", "ptr-str-hops"])
def test_task_parameters_of_another_type_are_named_with_the_type(make, message):
    # a suite file's value reaches the task as TOML gave it
    with pytest.raises(ValueError) as raised:
        make()
    assert str(raised.value) == message


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        AdditionTask().batch(0, torch.Generator())


@pytest.mark.parametrize("task", TASKS, ids=TASK_IDS)
def test_exact_match_oracle_and_wrong_model(task):
    assert exact_match_accuracy(NextByteModel(offset=0), task, n_examples=50, batch_size=16) == 1.0
    assert exact_match_accuracy(NextByteModel(offset=1), task, n_examples=50, batch_size=16) == 0.0


class WrongOnLastAnswerByte(NextByteModel):
    def __init__(self, task):
        super().__init__()
        self.last_answer_position = task.prompt_len + task.answer_len - 2

    def forward(self, idx, targets=None, **kwargs):
        logits, _ = super().forward(idx, targets, **kwargs)
        logits[:, self.last_answer_position] = logits[:, self.last_answer_position].roll(1, dims=-1)
        return logits, None


class WrongOutsideAnswer(NextByteModel):
    def __init__(self, task):
        super().__init__()
        self.first_answer_position = task.prompt_len - 1

    def forward(self, idx, targets=None, **kwargs):
        logits, _ = super().forward(idx, targets, **kwargs)
        prompt = slice(0, self.first_answer_position)
        logits[:, prompt] = logits[:, prompt].roll(1, dims=-1)
        return logits, None


def test_exact_match_needs_every_answer_byte():
    task = AdditionTask(3)
    assert exact_match_accuracy(WrongOnLastAnswerByte(task), task, n_examples=20) == 0.0
    assert exact_match_accuracy(WrongOutsideAnswer(task), task, n_examples=20) == 1.0


def test_exact_match_counts_partial_success():
    task = PointerChasingTask(4, 2)

    class RightWhenAnswerIsA(NextByteModel):
        def forward(self, idx, targets=None, **kwargs):
            logits, _ = super().forward(idx, targets, **kwargs)
            logits[:, -2] = nn.functional.one_hot(torch.tensor(ord("a")), 256).float()
            return logits, None

    _, y = task.batch(200, torch.Generator().manual_seed(0))
    share_of_a = (y[:, -2] == ord("a")).float().mean().item()
    accuracy = exact_match_accuracy(RightWhenAnswerIsA(), task, n_examples=200, batch_size=64)
    assert accuracy == pytest.approx(share_of_a)
    assert 0.1 < share_of_a < 0.4


def test_exact_match_restores_mode_and_passes_loops():
    task = AdditionTask(2)
    model = NextByteModel()
    model.train()
    exact_match_accuracy(model, task, n_examples=10, n_loops=7, batch_size=4)
    assert model.training
    assert len(model.calls) == 3  # 4 + 4 + 2 examples
    assert all(call == {"training": False, "grad": False, "n_loops": 7} for call in model.calls)

    model.eval()
    model.calls.clear()
    exact_match_accuracy(model, task, n_examples=10)
    assert not model.training
    assert all("n_loops" not in call for call in model.calls)


def test_exact_match_sees_the_same_examples_each_call():
    task = PointerChasingTask(4, 2)
    model = NextByteModel()
    exact_match_accuracy(model, task, n_examples=8, seed=5)
    exact_match_accuracy(model, task, n_examples=8, seed=5)
    exact_match_accuracy(model, task, n_examples=8, seed=6)
    first, again, other_seed = model.inputs
    assert torch.equal(first, again) and not torch.equal(first, other_seed)


def test_exact_match_restores_mode_after_an_error():
    class Broken(NextByteModel):
        def forward(self, idx, targets=None, **kwargs):
            raise RuntimeError("boom")

    model = Broken()
    model.train()
    with pytest.raises(RuntimeError):
        exact_match_accuracy(model, AdditionTask(), n_examples=4)
    assert model.training
