import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Test tensors are tiny: intra-op threads gain nothing, and on a busy 2-core machine
    their spin-waiting made each step ~40x slower."""
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
