"""Data-parallel optimizers on torch.distributed, with the state sharded across ranks (ZeRO 0-2).

Data parallel is a setting of strata's one optimizer class, not a class of its own: an
``_OffloadOptimizer`` with it on (``ShardedOffloadAdamW`` and friends, ``sharded_class(klass)``:
subclasses that only turn it on; ``shard(opt)``: turn it on for an existing optimizer) is
composed of a ``ShardLayout`` (``strata.layout``: this rank's slices, from the C++ engine's
shard arithmetic) and the ``ReducerGrads`` gradient path (``strata.grad_path``: buckets,
reductions, the parameters' all-gather). Its ranks split the work as
``zero_optimization.stage`` says (docs/distributed.md has the whole story):

- stage 0: every rank keeps the whole optimizer state; gradients are all-reduced in buckets
  of ``reduce_bucket_size`` elements; every rank updates everything.
- stage 1: every rank keeps the whole gradient (a flat buffer per dtype with
  ``contiguous_gradients``, torch's own ``.grad`` tensors without); at the accumulation
  boundary the gradients are all-reduced (``reduce_scatter: false``) or reduced to the rank
  that owns them (``reduce_scatter: true``: one ``reduce_scatter_tensor`` per round of buckets
  where the backend has it (NCCL), a reduce to the owner per bucket where it does not (Gloo));
  each rank updates its own shard of the state; the new parameters are all-gathered in rounds
  of ``allgather_bucket_size`` elements.
- stage 2 (and 3, which the config parser already said runs as 2): gradients are reduced as
  they become ready in every backward (gradient hooks), bucket by bucket; a bucket never spans
  two shards, so it is reduced to its one owner (``reduce``; ``all_reduce`` with
  ``reduce_scatter: false``), added into the owner's flat shard gradient buffer, and dropped
  (``.grad`` is None afterwards). Each rank keeps only its shard of the gradients. Parameters
  are all-gathered as at stage 1.

``overlap_comm``: reductions are launched asynchronously from the gradient hooks while backward
goes on (at stage 0 and 1 during the backward that ends an accumulation step, which
``Engine.backward`` / ``optimizer.backward(loss)`` tell apart), at most two in flight, and
waited for at the end of backward; without it they run synchronously (stage 2: in the hook
that completes the bucket; stage 0/1: at the boundary).

Sharding: per parameter dtype, the trainable parameters in gradient-ready order (the engine's
order) form a flat space; rank r owns the contiguous range ``[N*r/W, N*(r+1)/W)`` of it. A
parameter may be split between ranks: the C++ engine of each rank gets the owned slices as its
parameters (name, numel, address inside the parameter), so its pinned pool, swap file and
gradient arena hold only that shard, and its update writes the new values straight into the
model's memory; the other slices arrive with the all-gather.

``data_types.grad_accum_dtype`` different from the parameters' dtype: at stage 2 the shard's
arena has that dtype, so each backward's reduced buckets are added into it in that dtype; at
stages 0 and 1 the gradients accumulate in torch's ``.grad`` (the parameters' dtype), the engine
gets the config without the key, and one warning says so.

Global quantities: ``grad_stats()`` is the sum of squares and the inf/NaN flag over every shard
(all-reduced), so clipping and fp16 overflow act on the global gradient. ``step()`` divides the
summed gradients by the world size (an average, like DDP) unless the engine passes its own
multiplier (``Engine`` folds 1/world, the loss scale and the clip coefficient into one).

Every rank must make the same calls in the same order (backward, step, zero_grad,
state_dict, add_param_group, changes of ``requires_grad``): several of them communicate.
"""

from .grad_path import DEFAULT_BUCKET, MAX_IN_FLIGHT, Settings, _make_buckets  # noqa: F401
from .layout import Space, shard_bounds  # noqa: F401
from .optim import OffloadAdagrad, OffloadAdam, OffloadAdamW, OffloadSGD, _OffloadOptimizer


# ---------------------------------------------------------------------------------------
# the data-parallel names


_CLASSES = {}


def sharded_class(klass):
    """The data-parallel version of a strata optimizer class (cached): a subclass that only
    turns data parallel on; checkpoints record ``klass``'s name."""
    if not issubclass(klass, _OffloadOptimizer):
        raise TypeError(f"sharded_class: {klass.__name__} is not a strata optimizer")
    if klass._data_parallel:
        return klass
    made = _CLASSES.get(klass)
    if made is None:
        made = type(f"Sharded{klass.__name__}", (klass,),
                    {"__doc__": f"{klass.__name__} with data-parallel sharding "
                                "(strata.sharded).", "__module__": __name__,
                     "_data_parallel": True, "_data_parallel_alias": True})
        _CLASSES[klass] = made
    return made


def shard(opt):
    """Make an existing strata optimizer data parallel (its state is carried over piece by
    piece to an engine holding this rank's shard; the whole engine it had is released)."""
    return opt._set_data_parallel(True)


ShardedOffloadAdamW = sharded_class(OffloadAdamW)
ShardedOffloadAdam = sharded_class(OffloadAdam)
ShardedOffloadSGD = sharded_class(OffloadSGD)
ShardedOffloadAdagrad = sharded_class(OffloadAdagrad)
