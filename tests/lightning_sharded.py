"""Lightning training under FSDP2 (`ModelParallelStrategy`) with the loopdiag callback, for
`test_integrations.py`: run with `python` (one process) or `torchrun` (one rank each), it
writes each rank's records to OUT/rank<r>.json.

    lightning_sharded.py OUT DEVICES

Both draw the same global batch of 4 rows per step: one process all 4, each of 2 ranks its
2 rows of them (a sampler without shuffling; Lightning's own would shuffle).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import loopdiag
from loopdiag.integrations.lightning import LoopdiagCallback

VOCAB, SEQ_LEN, BATCH = 32, 16, 4


class ShardedLooped(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = loopdiag.build_model("looped", loopdiag.models.preset("tiny", vocab_size=VOCAB))

    def configure_model(self):
        if self.device_mesh is not None:  # each block, then the rest: the usual FSDP2 recipe
            for block in self.model.blocks:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return self.model(*batch)[1]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out: Path, devices: int) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    tokens = torch.randint(0, VOCAB, (32, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    sampler = DistributedSampler(data, num_replicas=devices, rank=int(os.environ.get("RANK", 0)), shuffle=False)
    callback = LoopdiagCallback(module="model", stats="full", costly_every=1)  # attention too
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(ShardedLooped(), DataLoader(data, batch_size=BATCH // devices, sampler=sampler))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(callback.recorder.records))
    # the Trainer leaves its process group up; left to interpreter exit, gloo's threads can
    # abort the rank (SIGABRT, "terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
