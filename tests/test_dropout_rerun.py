"""Dropout and the loop statistics: with dropout in the model, each logged training forward
is run again in eval mode without gradients, and its per-loop statistics are recorded."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_probes import APPROX, Outputs, batch, by_hand
from torch import nn

from loopdiag import probes
from loopdiag.probes import applies_dropout

D = 16


class DropoutLooped(nn.Module):
    """One `nn.TransformerEncoderLayer` (its dropout on) applied `n_loops` times."""

    def __init__(self, dropout: float = 0.3, n_loops: int = 3, extra_loop_in_training: bool = False,
                 noise: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.n_loops, self.extra_loop_in_training, self.noise = n_loops, extra_loop_in_training, noise
        self.embed = nn.Embedding(256, D)
        self.block = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=dropout, batch_first=True)
        self.head = nn.Linear(D, 256)

    def forward(self, idx, targets):
        x = self.embed(idx)
        if self.noise:  # drawn in every mode, the rerun's too
            x = x + self.noise * torch.randn_like(x)
        for _ in range(self.n_loops + (self.training and self.extra_loop_in_training)):
            x = self.block(x)
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def step(model, rec, optimizer=None, seed: int = 0, number: int = 0):
    loss = model(*batch(seed))[1]
    loss.backward()
    rec.after_backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()
    return loss, rec.end_step(number, loss=loss)


def test_the_statistics_are_those_of_the_model_without_dropout_and_the_gradient_the_training_forwards():
    model = DropoutLooped()
    training_outputs, eval_outputs = Outputs(model.block), Outputs(model.block)
    rec = probes.attach(model, "block")
    assert rec.rerun_without_dropout  # found on its own
    loss = model(*batch())[1]
    outputs = list(training_outputs.tensors)
    grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    loss.backward()
    rec.after_backward()
    record = rec.end_step(0, loss=loss)
    eval_outputs.tensors = eval_outputs.tensors[len(outputs):]  # the rerun's
    assert len(eval_outputs.tensors) == 3 and not any(o.requires_grad for o in eval_outputs.tensors)
    for stat, expected in by_hand(eval_outputs.tensors).items():
        assert record[stat] == pytest.approx(expected, **APPROX), stat
    assert record["act_grad_norm"] == pytest.approx([g.norm().item() for g in grads], **APPROX)
    # the training forward's own statistics carry the dropout noise: they differ
    assert record["token_corr"] != pytest.approx(by_hand(outputs)["token_corr"], rel=1e-3)


def test_off_the_statistics_are_the_training_forwards():
    model = DropoutLooped()
    outputs = Outputs(model.block)
    rec = probes.attach(model, "block", rerun_without_dropout=False)
    _, record = step(model, rec)
    assert len(outputs.tensors) == 3  # no second forward
    for stat, expected in by_hand(outputs.tensors).items():
        assert record[stat] == pytest.approx(expected, **APPROX), stat


def test_training_is_unchanged_by_the_rerun():
    losses, weights = [], []
    for recorded in (False, True):
        model = DropoutLooped(noise=1e-3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rec = probes.attach(model, "block", rerun_without_dropout=recorded)
        torch.manual_seed(5)  # the dropout masks' stream
        losses.append([step(model, rec, optimizer, seed=i, number=i)[0].item() for i in range(4)])
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert all(module.training for module in model.modules())  # the modes are restored
        rec.detach()
    assert losses[0] == losses[1]
    assert torch.equal(weights[0], weights[1])


def test_only_logged_training_forwards_are_run_again():
    model = DropoutLooped()
    calls = Outputs(model.block)
    rec = probes.attach(model, "block", log_every=2)
    step(model, rec, number=0)
    assert len(calls.tensors) == 6
    step(model, rec, number=1)  # not logged
    assert len(calls.tensors) == 9
    model.eval()
    with torch.no_grad():
        model(*batch())  # an evaluation forward has no dropout to see past
    model.train()
    step(model, rec, number=2)
    assert len(calls.tensors) == 12 + 6


def test_a_rerun_that_reaches_another_loop_count_keeps_the_training_forwards_statistics():
    model = DropoutLooped(extra_loop_in_training=True)
    outputs = Outputs(model.block)
    rec = probes.attach(model, "block")
    _, record = step(model, rec)
    assert record["n_loops"] == 4
    assert record["token_corr"] == pytest.approx(by_hand(outputs.tensors[:4])["token_corr"], **APPROX)


class FailsInEval(DropoutLooped):
    def forward(self, idx, targets):
        if not self.training:
            raise RuntimeError("this model only trains")
        return super().forward(idx, targets)


def test_a_forward_that_fails_in_eval_mode_turns_the_rerun_off_and_training_goes_on():
    model = FailsInEval()
    outputs = Outputs(model.block)
    rec = probes.attach(model, "block")
    with pytest.warns(UserWarning, match="rerun_without_dropout is off.*only trains"):
        _, record = step(model, rec)
    assert not rec.rerun_without_dropout
    assert all(module.training for module in model.modules())
    assert record["token_corr"] == pytest.approx(by_hand(outputs.tensors)["token_corr"], **APPROX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, rec, number=1)  # said once


@pytest.mark.parametrize("module,found", [
    (nn.TransformerEncoderLayer(D, 2, dropout=0.1), True),
    (nn.TransformerEncoderLayer(D, 2, dropout=0.0), False),
    (nn.MultiheadAttention(D, 2, dropout=0.1), True),
    (nn.Sequential(nn.Linear(D, D), nn.Dropout(0.0)), False),
    (nn.Sequential(nn.Linear(D, D), nn.Dropout1d(0.2)), True),
])
def test_dropout_is_found_where_it_is_active(module, found):
    assert applies_dropout(module) is found


def test_a_bad_setting_is_refused():
    with pytest.raises(ValueError, match="rerun_without_dropout"):
        probes.attach(DropoutLooped(), "block", rerun_without_dropout="yes")
