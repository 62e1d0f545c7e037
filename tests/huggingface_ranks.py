"""The Hugging Face Trainer on several processes with the loopdiag callback, for
`test_integrations.py`: run with `python` (one process) or `torchrun` (one rank each), it
writes each rank's records and the Trainer's own `grad_norm`s to OUT/rank<r>.json. On CPU
(`use_cpu`) the Trainer does not enable its FSDP, whatever `fsdp_config` says: the ranks
train under DDP.

    huggingface_ranks.py OUT DEVICES

The Trainer shards the data itself: one process trains on rows 0-3 of each step, 2 ranks
on their halves of the same rows.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import transformers

from loopdiag.integrations.huggingface import LoopdiagCallback

VOCAB, SEQ_LEN, BATCH = 64, 16, 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.tokens = torch.randint(0, VOCAB, (32, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main(out: Path, devices: int) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=1,
        inner_group_num=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    model = transformers.AlbertForMaskedLM(config)
    # no clipping (a bound never reached), so the Trainer logs the norm the probes see
    args = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=BATCH // devices, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_grad_norm=1e9, seed=0)
    callback = LoopdiagCallback(loop_module="albert.encoder.albert_layer_groups.0")
    trainer = transformers.Trainer(model, transformers.TrainingArguments(**args), train_dataset=Tokens(),
                                   callbacks=[callback])
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps({"records": callback.recorder.records, "trainer_grad_norms": logged}))
    # The DDP wrapper goes while the group is still registered: freed later, its reducer drops
    # the group's last reference, and the group's destructor then joins gloo's threads under
    # the GIL, which a thread freeing a finished collective's tensors waits for (a deadlock,
    # pytorch/pytorch#56297). Left up to interpreter exit, the group can abort the rank.
    del trainer
    gc.collect()
    assert not any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
