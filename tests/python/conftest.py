import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

# Before torch loads libgomp: its OpenMP threads sleep between operations (faster on a small
# machine, docs/performance.md), and initialize's hint about it stays out of the tests that
# compare warning lists (test_openmp_spin_is_said_once... clears it to test the hint).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def swap_dir(tmp_path):
    """A swap folder on the disk (not tmpfs), so O_DIRECT and io_uring are exercised."""
    d = tmp_path / "swap"
    d.mkdir()
    return d


def fs_type(path):
    """The file-system type of the mount holding `path` ("ext4", "tmpfs", ...), from
    /proc/self/mountinfo (longest mount point that is a prefix of the real path)."""
    real = os.path.realpath(path)
    best, kind = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, right.split()[0]
    return kind


def skip_unless_block_io(path):
    """/proc/self/io's read_bytes/write_bytes count block-device I/O only: skip (with the reason)
    a check of them when `path` lives on a file system with no block device under it."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("/proc/self/io is not available here")
    kind = fs_type(path)
    if kind in ("tmpfs", "ramfs", "nfs", "nfs4", "fuse", "9p", "virtiofs", None):
        pytest.skip(f"{path} is on {kind}: /proc/self/io counts block-device I/O only, which "
                    f"this file system does not do")


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
