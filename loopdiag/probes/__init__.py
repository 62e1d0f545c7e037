"""Per-loop probes for weight-tied (looped) models.

    rec = loopdiag.probes.attach(model, loop_module="block")   # or None for model.loop_out
    for step in range(n):
        loss = ...; loss.backward()
        rec.after_backward()              # gradient statistics, before clipping / the optimizer
        opt.step(); opt.zero_grad()
        rec.end_step(step, loss=loss, lr=opt.param_groups[0]["lr"])   # one host sync, record
    rec.frame(); rec.loop_frame()

Inside `loopdiag.train.train`, pass `RecorderCallback(rec, on_record=...)` as a callback.

A record is a flat dict of scalars and per-loop lists (index 0 = loop 1; flattened by
`flatten_record` to `resid_norm/loop_01`, ...). x^(k) is the loop module's output at
loop k, seen as (batch, tokens, features) (earlier dims are folded into the batch; a 2-D
output is one sequence, or a root input's B sequences of T tokens when it has B·T rows;
one packed row (1, N) holds several sequences when the model is given integer
`position_ids` (1, N) that restart, as Hugging Face's `DataCollatorWithFlattening` makes).

With dropout in the model (`rerun_without_dropout`), resid_norm, rel_update and token_corr
are those of the same inputs run again in eval mode after the backward, x^(k) without
dropout noise; act_grad_norm stays the training forward's.

Per loop:
  resid_norm      mean over tokens of |x^(k)|_2
  rel_update      mean over tokens of |x^(k) - x^(k-1)| / |x^(k)|; NaN at loop 1, which
                  has no previous loop output to compare with
  token_corr      mean cosine between distinct tokens of a sequence, averaged over the
                  batch, each sequence weighted by its T − 1 (1 = every token points the
                  same way: representation collapse);
                  read from the unit vectors' spread about their mean, so identical
                  tokens read 1 to float32 precision at any sequence length
  act_grad_norm   |dloss/dx^(k)|_F over the whole output tensor; present when the step's
                  forwards ran with gradients, NaN for a loop whose output got none (a
                  truncated-backprop loop under no_grad, or no backward before end_step);
                  absent in a torch.compile'd forward (its tensor hook would break the graph)
  attn_entropy, attn_max_logit, resid_norm/layer_NN
                  stats="full" on a costly step only: mean attention entropy (nats) and max
                  pre-softmax logit over the loop's attention calls, and the residual norm
                  after each layer of the loop (reference models only)
Per step:
  step, n_loops, loss, lr
  grad_norm       global, before clipping (the trainer's when given)
  grad_norm/<group>  per module group, see `stats.group_name` (blocks.0.attn, blocks.0.mlp, wte, ...)
  shared_grad_norm   of the shared (looped) weights
  grad_cos        cosine between this step's and the previous step's shared gradient
  sign_flip       fraction of shared coordinates whose gradient sign flipped since the
                  previous step (coordinates that are exactly 0 in either are ignored)
  gnorm_cv, gnorm_autocorr  over the last `window` steps of shared_grad_norm, see
                  `stats.window_stats`
  update_ratio    |W_after - W_before| / |W_before| over the shared weights, flattened
Non-finite values are recorded as they are. Gradient statistics are absent on a step
without `after_backward`; grad_cos / sign_flip when the previous step gave no gradient;
the window statistics until the window is full.
"""

from loopdiag.probes.api import applies_dropout, attach
from loopdiag.probes.callback import RecorderCallback
from loopdiag.probes.recorder import LoopRecorder
from loopdiag.probes.records import Record, flatten_record, records_frame, records_loop_frame

__all__ = ["LoopRecorder", "Record", "RecorderCallback", "applies_dropout", "attach", "flatten_record",
           "records_frame", "records_loop_frame"]
