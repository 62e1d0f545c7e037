"""The public API is pinned: renaming or dropping a name is a deliberate change."""

import subprocess
import sys

import pytest

import loopdiag

PUBLIC = {
    "ARCHITECTURES", "AdditionTask", "CallbackSink", "ConsoleSink", "Event", "LoopRecorder", "ModelConfig",
    "Monitor", "PointerChasingTask", "RecorderCallback", "RunSession", "RunSpec", "RunWriter", "TrainConfig",
    "WandbRun", "attach",
    "build_model", "default_detectors", "exact_match_accuracy", "load_corpus", "load_run", "load_suite",
    "preset", "replay", "run_one", "suite_table", "train", "unigram_loss", "verdict", "write_report",
    "__version__",
}


def test_public_names_resolve():
    assert set(loopdiag.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(loopdiag, name) is not None


@pytest.mark.torchless
def test_import_is_light():
    code = "import sys, loopdiag; print(any(m in sys.modules for m in ('torch', 'wandb', 'matplotlib')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.torchless
def test_detectors_and_analysis_do_not_need_matplotlib_or_wandb():
    code = ("import sys, loopdiag.detect, loopdiag.analysis, loopdiag.store; "
            "print(any(m in sys.modules for m in ('wandb', 'matplotlib')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
