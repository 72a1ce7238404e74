"""What the Python benches share about fio: its I/O buffers in huge pages, as strata's pinned
pool has them (``--iomem=shmhuge``). Without them fio's 4 KiB-page buffers ran an AMD EPYC VM's
disk at about half the rate (0.46 / 0.35 against 2.37 / 2.18 GB/s), so a bound measured that
way is too low."""

import sys

HUGE_PAGES_NEEDED = 16  # 2 MiB pages: 1 MiB blocks x queue depth 32


def huge_pages_for_fio():
    """True when enough huge pages are reserved for ``--iomem=shmhuge``."""
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            return int(f.read()) >= HUGE_PAGES_NEEDED
    except (OSError, ValueError):
        return False


def iomem_args(huge):
    return ["--iomem=shmhuge"] if huge else []


def warn_no_huge_pages(bench):
    print(f"{bench}: no reserved huge pages (/proc/sys/vm/nr_hugepages < {HUGE_PAGES_NEEDED}): "
          "fio runs with 4 KiB-page buffers, strata's pool with huge pages, so the bound is low; "
          "as root: echo 64 > /proc/sys/vm/nr_hugepages", file=sys.stderr)
