"""The GPU benchmark without a GPU: it says it skipped, and its code runs on CPU."""

from unittest import mock

import pytest
import torch
from benchmark_scripts import loaded


@pytest.fixture(scope="module")
def bench():
    yield from loaded("gpu.py", "gpu_benchmark")


def test_without_cuda_it_skips_with_the_reason(bench, capsys):
    with mock.patch.object(torch.cuda, "is_available", return_value=False), \
            mock.patch.object(bench, "measure") as measure:
        bench.main([])
    assert "skipped, no CUDA device is visible" in capsys.readouterr().out
    measure.assert_not_called()


def test_the_same_code_runs_on_cpu(bench, capsys):
    bench.main(["--device", "cpu", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--seq-len", "16",
                "--batch", "2", "--repeats", "2", "--warmup", "1", "--loops", "2", "--no-compile"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu, one device; bf16 autocast, eager")
    assert [line.split()[:2] for line in lines[2:]] == [["looped", "2"], ["flt", "2"]]
    assert all(line.split()[5].endswith("x") for line in lines[2:])
