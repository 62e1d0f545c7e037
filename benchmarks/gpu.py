"""Step time and probe overhead at scale: ~100 M-parameter `looped` and `flt` models,
bf16 autocast, compiled, sharded with FSDP2 when several GPUs train together.

    python benchmarks/gpu.py [--repeats 20] [--loops 4 12] [--archs looped flt]
    torchrun --standalone --nproc_per_node 8 benchmarks/gpu.py      # FSDP2 over 8 GPUs

Per architecture and loop count: two copies of one model, `torch.compile`d, one with the
probes attached (cheap statistics, every step logged); a step is forward + backward + AdamW
step, timed between CUDA synchronizations, each repeat timing both in alternating order so
noise hits both alike; the ratio is of the medians. Target: probes <= 1.05x at K = 12.
Under torchrun the global batch is split over the ranks and rank 0 prints.

Without a CUDA device it says so and exits without measuring (exit status 0). `--device
cpu` with a small `--d-model` runs the same code on CPU (gloo under torchrun), to check
the script, not to measure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.distributed.fsdp import fully_shard

from loopdiag import distributed, probes
from loopdiag.models import ModelConfig, build_model

TARGET = 1.05


def make_step(model: torch.nn.Module, compiled: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              recorder: probes.LoopRecorder | None) -> Callable[[int], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(i: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = compiled(x, y)
        loss.backward()
        if recorder is not None:
            recorder.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recorder is not None:
            recorder.end_step(i, loss=loss, lr=1e-4)
        synchronize(device)
        return time.perf_counter() - start

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[int, float, float]:
    """(parameters, median step seconds without probes, with probes)."""
    torch.manual_seed(0)
    plain = build_model(arch, cfg).to(device)
    n_params = sum(p.numel() for p in plain.parameters())
    probed = copy.deepcopy(plain)
    for model in (plain, probed):
        if distributed.world_size() > 1:
            fully_shard(model)  # the root only, as the trainer does: one gather per forward
    recorder = probes.attach(probed)
    generator = torch.Generator().manual_seed(0)
    rows = args.batch // distributed.world_size()
    tokens = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=generator).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    wrap = torch.compile if args.compile else (lambda model: model)
    steps = [make_step(plain, wrap(plain), x, y, device, None),
             make_step(probed, wrap(probed), x, y, device, recorder)]
    for i in range(args.warmup):  # compiles here
        for step in steps:
            step(i)
    samples: list[list[float]] = [[], []]
    for r in range(args.repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            samples[which].append(steps[which](args.warmup + r))
    recorder.detach()
    return n_params, statistics.median(samples[0]), statistics.median(samples[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["looped", "flt"])
    parser.add_argument("--loops", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    # d_model 1024, 8 blocks: 12 * 1024^2 * 8 ~ 100 M parameters in the shared blocks
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows), split over the ranks")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped, no CUDA device is visible (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}). Nothing was measured. Run it on a machine with a GPU, or "
              "pass --device cpu with a small --d-model to check the script itself.")
        return
    with distributed.torchrun_group(args.device):
        device = distributed.rank_device(args.device)
        world = distributed.world_size()
        parallel = f"FSDP2 over {world} ranks" if world > 1 else "one device"
        if distributed.is_main():
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"{name}, {parallel}; bf16 autocast, {'compiled' if args.compile else 'eager'}; "
                  f"d_model={args.d_model} L={args.n_layers} seq={args.seq_len} global batch={args.batch} "
                  f"repeats={args.repeats}")
            print(f"{'arch':>7}{'K':>4}{'params':>9}{'step (ms)':>11}{'tokens/s':>11}{'probes':>9}   target")
        for arch in args.archs:
            for n_loops in args.loops:
                cfg = ModelConfig(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                                  n_loops=n_loops, seq_len=args.seq_len)
                n_params, t_plain, t_probes = measure(arch, cfg, args, device)
                if distributed.is_main():
                    verdict = "" if n_loops != 12 else ("ok" if t_probes / t_plain <= TARGET else "MISSED")
                    print(f"{arch:>7}{n_loops:>4}{n_params / 1e6:>8.1f}M{t_plain * 1e3:>11.1f}"
                          f"{args.batch * args.seq_len / t_plain:>11.0f}{t_probes / t_plain:>8.3f}x"
                          f"   <= {TARGET} {verdict}")


if __name__ == "__main__":
    main()
