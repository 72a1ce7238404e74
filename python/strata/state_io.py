"""Moving optimizer state between the engine's records and torch tensors, by record.

Every function here takes *engine parameters*: the index ``j`` the engine was built with
(a whole model parameter, or this rank's slice of one). Each visits every sub-group record
it needs once, in swap-file order, with a few records in flight (``Engine.read_records`` /
``Engine.write_records`` in C++), so the bytes fetched and stored are the state's size,
not the state's size times the tensors per sub-group. Nothing else in the package calls
the engine's per-parameter state access.

Tensors are flat, contiguous float32 on the host, ``numel`` of the engine parameter;
slot 0 is the fp32 master weights, slots 1.. the optimizer's state in its declared order.
"""

import torch

from ._torch_compat import tensor_from_buffer

__all__ = ["read_slots", "write_slots", "copy_slots"]


def _floats(mv):
    return tensor_from_buffer(mv, torch.float32)


def _check(t, n, what):
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n or t.device.type != "cpu":
        raise ValueError(f"strata: {what} must be a contiguous float32 host tensor of {n} "
                         f"elements (got {t.dtype}, {tuple(t.shape)}, {t.device})")


def read_slots(engine, requests):
    """Fill ``requests`` = {j: [out tensor per slot, or None]} from the engine's records
    (one fetch per record holding any of them)."""
    if not requests:
        return
    want = {}
    for j, outs in requests.items():
        n = engine.param_numel(j)
        for k, t in enumerate(outs):
            if t is not None:
                _check(t, n, f"the output for slot {k} of engine parameter {j}")
        want[j] = outs

    def visit(slices, mv):
        record = _floats(mv)
        for j, po, off, n, stride in slices:
            outs = want.get(j)
            if outs is None:
                continue
            for k, t in enumerate(outs):
                if t is not None:
                    t[po:po + n].copy_(record[k * stride + off:k * stride + off + n])

    engine.read_records(visit, list(want))


def write_slots(engine, sources):
    """Write ``sources`` = {j: [source tensor per slot, or None]} into the engine's records
    (each record holding any of them stored once; fetched first only when part of it is not
    overwritten)."""
    if not sources:
        return
    have = {}
    full = True
    for j, srcs in sources.items():
        n = engine.param_numel(j)
        for k, t in enumerate(srcs):
            if t is not None:
                _check(t, n, f"the source for slot {k} of engine parameter {j}")
        if len(srcs) < engine.param_slots(j) or any(t is None for t in srcs):
            full = False
        have[j] = srcs

    def visit(slices, mv):
        record = _floats(mv)
        for j, po, off, n, stride in slices:
            srcs = have.get(j)
            if srcs is None:
                continue
            for k, t in enumerate(srcs):
                if t is not None:
                    record[k * stride + off:k * stride + off + n].copy_(t[po:po + n])

    engine.write_records(visit, list(have), full)


def copy_slots(src, dst, pairs):
    """Carry state from engine ``src`` to engine ``dst``: ``pairs`` = [(dst_j, src_j,
    first_slot, numel, nslots)], equal numel each; slots first_slot.. are copied (numel and
    nslots are checked against the engines). Each of ``dst``'s records is written once;
    ``src``'s are read through a small cache, once each when the orders match."""
    if not pairs:
        return
    copies = []
    for dj, sj, first, n, nslots in pairs:
        if src.param_numel(sj) != n or dst.param_numel(dj) != n:
            raise ValueError(f"strata: copy_slots: engine parameter {sj} -> {dj}: {n} elements "
                             f"given, the engines have {src.param_numel(sj)} and "
                             f"{dst.param_numel(dj)}")
        if first < nslots:
            copies.append((dj, sj, first))
    dst.copy_state_from(src, copies)
