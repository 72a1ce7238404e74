"""Which engine parameters an optimizer's engine holds: whole model parameters, or this
rank's shard of them.

A layout answers the same questions for both cases, so the optimizer's step, state_dict,
load_state_dict, state access, rebuild and checkpoints are written once against it:

- ``slices[j]`` = ``(i, po, fo, n)``: engine parameter ``j`` is elements ``[po, po + n)`` of
  model parameter ``i`` (``fo``: where they sit in the flat space, None for whole parameters);
- ``slice_of[i]``: the engine parameter holding this rank's piece of model parameter ``i``
  (absent where the rank holds none of it); ``local_range(i)``: that piece as ``(po, n)``;
- ``gather(whole)``: complete tensors of whole model parameters of which each rank filled its
  own piece (whole parameters: nothing to do; a shard: each piece broadcast by its owner);
- ``keeps_pieces_of(prev)``: whether every rank holds the same pieces as in layout ``prev``
  (then a rebuild copies state engine parameter by engine parameter, with no communication).

``WholeLayout``: the engine's parameters are the model's (j == i). ``ShardLayout``: per dtype,
the trainable parameters in the engine's order lie back to back in a flat space of ``N``
elements; rank ``r`` of ``W`` owns ``[N*r/W, N*(r+1)/W)`` of it. The arithmetic is the C++
engine's (``strata/engine/shard.h``, bound as ``strata._C.FlatSpace``).
"""

import torch

from . import _C, comm
from ._torch_compat import dtype_from_name, dtype_name
from .param_tier import numel as _numel


def shard_bounds(total, world):
    """Rank r owns [b[r], b[r+1]) of a space of ``total`` elements."""
    return list(_C.shard_bounds(int(total), int(world)))


class Space:
    """Where parameters sit in a flat coordinate space, per dtype (torch dtypes here).

    ``Space(entries, totals)``: entries (param index, dtype, offset, numel), totals {dtype: n}
    lengthening a dtype's space; ``Space.flat(params)``: parameters back to back per dtype.
    ``pieces(d, a, e)`` lists the parts of the parameters of dtype ``d`` that fall in
    ``[a, e)`` as (param index, offset in the parameter, offset in the space, numel), in space
    order; ``dtypes`` are in the order of their first parameter."""

    def __init__(self, entries, totals=None):
        self._init(_C.FlatSpace([(i, dtype_name(d), off, n) for i, d, off, n in entries],
                                {dtype_name(d): int(t) for d, t in (totals or {}).items()}))

    @classmethod
    def flat(cls, params):
        space = cls.__new__(cls)
        space._init(_C.FlatSpace.packed([_numel(p) for p in params],
                                        [dtype_name(p.dtype) for p in params]))
        return space

    def _init(self, flat):
        self._flat = flat
        self.dtypes = [dtype_from_name(n) for n in flat.dtypes]
        self.total = {d: flat.total(dtype_name(d)) for d in self.dtypes}
        self.offset = {i: (dtype_from_name(d), off, n) for i, d, off, n in flat.offsets()}

    def pieces(self, d, a, e):
        return self._flat.pieces(dtype_name(d), int(a), int(e))

    def bounds(self, world):
        """{dtype: shard bounds} of every dtype's space."""
        return {d: self._flat.bounds(dtype_name(d), world) for d in self.dtypes}

    def shard_slices(self, world, rank):
        """What ``rank`` owns, as (param index, offset in param, flat offset, numel), by
        parameter."""
        return self._flat.shard_slices(world, rank)


class WholeLayout:
    """The engine holds every managed parameter whole: engine parameter j is parameter j."""

    sharded = False

    def __init__(self, managed):
        self.slices = [(i, 0, None, _numel(p)) for i, p in enumerate(managed)]
        self.slice_of = {i: i for i in range(len(managed))}

    def local_range(self, i):
        return 0, self.slices[i][3]

    def gather(self, whole, stats=None):
        """Nothing to gather: this rank read every parameter whole."""

    def keeps_pieces_of(self, prev):
        return isinstance(prev, WholeLayout)

    @property
    def numel(self):
        """Elements this rank's engine holds."""
        return sum(s[3] for s in self.slices)


class _Sliced:
    """What the sharded layouts share: ``slices`` [(param index, offset in it, ..., numel)]
    of this rank, ``slice_of`` {param index: slice}."""

    def local_range(self, i):
        """(offset, numel) of this rank's piece of parameter ``i``; (0, 0) when it has none."""
        j = self.slice_of.get(i)
        if j is None:
            return 0, 0
        _, po, _, n = self.slices[j]
        return po, n


class ShardLayout(_Sliced):
    """This rank's slices of the flat per-dtype space (see the module doc)."""

    sharded = True

    def __init__(self, managed, world, rank):
        self.world, self.rank = int(world), int(rank)
        self.space = Space.flat(managed)
        self.bounds = self.space.bounds(self.world)
        self.slices = self.space.shard_slices(self.world, self.rank)
        self.slice_of = {s[0]: j for j, s in enumerate(self.slices)}
        self._signature = [(id(p), _numel(p), p.dtype) for p in managed]

    def gather(self, whole, stats=None):
        """``whole`` = {param index: [whole flat tensor per slot, or None]} with this rank's
        pieces filled: every rank's pieces are broadcast by their owners (a collective: every
        rank passes the same parameters and slots, visited in the same order)."""
        for i in sorted(whole):
            d, off, n_all = self.space.offset[i]
            b = self.bounds[d]
            for t in whole[i]:
                if t is None:
                    continue
                for r in range(self.world):
                    a, e = max(b[r], off), min(b[r + 1], off + n_all)
                    if a < e:
                        comm.broadcast(t[a - off:e - off], r, stats=stats)

    def keeps_pieces_of(self, prev):
        # The same parameters in the same order over the same ranks: the same pieces on every
        # rank (a decision every rank takes alike, so none of them waits in a broadcast alone).
        return (isinstance(prev, ShardLayout) and prev.world == self.world
                and prev.rank == self.rank and prev._signature == self._signature)

    @property
    def numel(self):
        return sum(s[3] for s in self.slices)


class PartitionLayout(_Sliced):
    """ZeRO-3 across ranks: engine parameter ``j`` is this rank's chunk of one model
    parameter, DeepSpeed's partitioning (``strata.param_tier``): parameter ``i`` of ``n``
    elements is cut into chunks of ``c = ceil(n / W)``, rank ``r`` owning
    ``[min(r c, n), min((r + 1) c, n))``. Persistent parameters (whole on every rank) are cut
    the same way for the optimizer state; their updated chunks are broadcast by their owners
    after the step (``gather``)."""

    sharded = True

    def __init__(self, managed, world, rank):
        self.world, self.rank = int(world), int(rank)
        self.slices = []
        self.chunk = []  # i -> c
        for i, p in enumerate(managed):
            n = _numel(p)
            c = -(-n // self.world)
            self.chunk.append(c)
            a = min(self.rank * c, n)
            k = min(a + c, n) - a
            if k > 0:
                self.slices.append((i, a, None, k))
        self.slice_of = {s[0]: j for j, s in enumerate(self.slices)}
        self._numels = [_numel(p) for p in managed]
        self._signature = [(id(p), _numel(p), p.dtype) for p in managed]

    def pieces(self, i):
        """[(rank, offset in the parameter, numel)] of parameter ``i``, non-empty ones."""
        n, c = self._numels[i], self.chunk[i]
        return [(r, r * c, min((r + 1) * c, n) - r * c) for r in range(self.world)
                if r * c < n]

    def gather(self, whole, stats=None):
        """As ``ShardLayout.gather``: each rank's pieces broadcast by their owners."""
        for i in sorted(whole):
            for t in whole[i]:
                if t is None:
                    continue
                for r, a, k in self.pieces(i):
                    comm.broadcast(t[a:a + k], r, stats=stats)

    def keeps_pieces_of(self, prev):
        return (isinstance(prev, PartitionLayout) and prev.world == self.world
                and prev.rank == self.rank and prev._signature == self._signature)

    @property
    def numel(self):
        return sum(s[3] for s in self.slices)


def whole_tensors(layout, params, slots):
    """{i: [fp32 tensor of params[i].numel() for each slot in ``slots[i]`` else None]} and the
    views of this rank's pieces of them, {j: [view or None]}, for state_io."""
    whole, local = {}, {}
    for i, wanted in slots.items():
        n_all = _numel(params[i])
        ts = [torch.empty(n_all, dtype=torch.float32) if w else None for w in wanted]
        whole[i] = ts
        j = layout.slice_of.get(i)
        if j is not None:
            _, po, _, n = layout.slices[j]
            local[j] = [None if t is None else t[po:po + n] for t in ts]
    return whole, local
