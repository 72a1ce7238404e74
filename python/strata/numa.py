"""NUMA binding for data-parallel ranks: which node a local rank runs on, and binding the
calling thread to it. Thin over ``strata._C``: the syscalls (sched_setaffinity,
set_mempolicy) are in the platform layer (``csrc/platform/affinity.cpp``)."""

import os

from . import _C


def _node_cpus(sysfs_root="/sys/devices/system/node"):
    """{node: [cpus]} for the NUMA nodes that have CPUs."""
    out = {}
    try:
        names = os.listdir(sysfs_root)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        try:
            with open(os.path.join(sysfs_root, name, "cpulist")) as f:
                text = f.read().strip()
        except OSError:
            continue
        cpus = []
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        if cpus:
            out[int(name[4:])] = cpus
    return out


def numa_node_for(local_rank, local_world, sysfs_root="/sys/devices/system/node"):
    """The NUMA node local rank ``local_rank`` of ``local_world`` binds to, or None (one node,
    or one process per machine). Ranks go round-robin over the nodes that have CPUs."""
    nodes = _node_cpus(sysfs_root)
    if len(nodes) < 2 or local_world < 2:
        return None
    order = sorted(nodes)
    return order[local_rank % len(order)]


def bind_numa_node(node, sysfs_root="/sys/devices/system/node"):
    """Run this thread (and the threads it starts later: the engine's update threads) on the
    CPUs of ``node``, and prefer that node for new memory (the pinned pool is pre-faulted by
    this thread). Returns a note saying what was done; a refusal is a note, not an error (the
    rank runs unbound)."""
    try:
        _C.bind_to_numa_node(int(node), os.fspath(sysfs_root))
    except (RuntimeError, ValueError, OSError) as exc:  # StrataError, ConfigError, StrataIOError
        return str(exc)
    return f"NUMA node {node}: CPUs and memory bound for local rank"
