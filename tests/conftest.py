from pathlib import Path

import pytest

try:
    import torch
except ModuleNotFoundError:  # the torch-free layers' run on Python 3.12 / 3.13 (.ci/run)
    torch = None


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Without torch, collect only the test files that hold `torchless` tests: the others
    import torch at the top. Such a file must itself import without torch (the run fails
    loudly if not); `-m torchless` then selects its tests."""
    if torch is None and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "pytest.mark.torchless" not in collection_path.read_text(encoding="utf-8")
    return None


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Test tensors are tiny: intra-op threads gain nothing, and on a busy 2-core machine
    their spin-waiting made each step ~40x slower."""
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def wandb_stays_local(tmp_path_factory):
    """W&B writes settings and caches under $HOME unless told otherwise; keep tests in tmp."""
    home = tmp_path_factory.mktemp("wandb-home")
    patch = pytest.MonkeyPatch()
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        patch.setenv(name, str(home / name.lower()))
    patch.setenv("WANDB_SILENT", "true")
    yield
    patch.undo()
