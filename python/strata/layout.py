"""Flat coordinates of the trainable parameters, per dtype, and their data-parallel shards.

Per dtype, the trainable parameters in the engine's order lie back to back in a flat space of
``N`` elements; rank ``r`` of ``W`` owns ``[N*r/W, N*(r+1)/W)`` of it. The arithmetic is the
C++ engine's (``strata/engine/shard.h``, bound as ``strata._C.FlatSpace``).
"""

from . import _C
from ._torch_compat import dtype_from_name, dtype_name


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
        space._init(_C.FlatSpace.packed([p.numel() for p in params],
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
