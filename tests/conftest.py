"""Shared test set-up: deterministic, 2-thread CPU runs; tests marked `cuda` skip without a GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
