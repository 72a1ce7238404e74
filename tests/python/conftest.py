import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def swap_dir(tmp_path):
    """A swap folder on the disk (not tmpfs), so O_DIRECT and io_uring are exercised."""
    d = tmp_path / "swap"
    d.mkdir()
    return d


def nvme_config(swap_dir, **extra):
    cfg = {
        "zero_optimization": {
            "sub_group_size": 50_000,
            "offload_optimizer": {"device": "nvme", "nvme_path": str(swap_dir), "buffer_count": 3},
        },
        "aio": {"block_size": 65536, "queue_depth": 16},
    }
    for path, value in extra.items():
        node = cfg
        parts = path.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg
