"""Shared test set-up: deterministic, 2-thread CPU runs; tests marked `cuda` skip without a GPU;
multi-process tests carry their markers (`make test-fast` leaves them out)."""

import pytest
import torch

# Every test in these folders starts processes or a cluster: `make test-fast` deselects them by
# marker, so a test added there without its marker would slip into the edit loop.
FOLDER_MARKERS = {"distributed": "distributed", "slurm": "slurm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.parent.name
        wanted = FOLDER_MARKERS.get(folder)
        if wanted and wanted not in item.keywords:
            raise pytest.UsageError(f"{item.nodeid} is in tests/{folder} but not marked {wanted}")
    if torch.cuda.is_available():
        return
    from coatnet_scale.distributed.device import cuda_unusable_reason

    skip = pytest.mark.skip(reason=f"needs CUDA: {cuda_unusable_reason()}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
