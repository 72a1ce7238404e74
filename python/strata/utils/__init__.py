"""``strata.utils``: DeepSpeed's ``deepspeed.utils`` helpers for one parameter's fp32 master,
optimizer state and gradient (its ``tensor_fragment`` API), and ``zero_to_fp32``.

A parameter's state lives in the record of its sub-group on whatever tier holds it, so each
``safe_get_*`` is a read of that slot from its tier (from NVMe: a read of the slot's bytes, not
of the whole record) into a new fp32 tensor, and each ``safe_set_*`` a write of it. Call them
for logging and surgery, not in the inner loop.

- ``safe_get_full_fp32_param(param)`` / ``safe_set_full_fp32_param(param, value)``: the fp32
  master weights (shaped like ``param``). As in DeepSpeed, setting the master does not change
  the model's (16-bit) weights until the next step writes them.
- ``safe_get_full_optimizer_state(param, key)`` / ``safe_set_full_optimizer_state(...)``: a
  state by torch's name (``"exp_avg"``, ``"exp_avg_sq"``, ``"momentum_buffer"``, ``"sum"``).
- ``safe_get_full_grad(param)`` / ``safe_set_full_grad(param, value)``: the gradient as
  accumulated for the coming step, in fp32 (with fp16 it still carries the loss scale and, with
  gradient accumulation, the 1/gradient_accumulation_steps factor, as the loss is divided by
  it). None when the parameter has no gradient. Setting one after an overlapped backward
  (``strata.overlap_backward``, on by default) is refused: that step's update already began.
- ``safe_get_local_*`` / ``safe_set_local_*``: this rank's slice, flat (one rank: the whole
  parameter, flat). With several ranks the ``full`` getters are collectives (every rank must
  call them); the gradient getters are refused there (strata reduces gradients into its shards
  in buckets, so no whole reduced gradient exists to return).

Parameters that no strata optimizer manages (frozen, or run by a client optimizer strata does
not offload) raise ``ValueError``.
"""

import torch

from .. import comm

__all__ = [
    "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_optimizer_state",
    "safe_set_full_optimizer_state", "safe_get_full_grad", "safe_set_full_grad",
    "safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_optimizer_state",
    "safe_set_local_optimizer_state", "safe_get_local_grad", "safe_set_local_grad",
]


def _owner(param):
    from ..optim import _live

    for opt in list(_live):
        if not opt.closed and opt.manages(param):
            return opt
    raise ValueError("strata.utils: this parameter is not managed by an open strata optimizer "
                     "(frozen, or run by a client optimizer strata does not offload)")


def safe_get_full_fp32_param(param):
    return _owner(param).read_state(param, "fp32")


def safe_set_full_fp32_param(param, value):
    _owner(param).write_state(param, "fp32", value)


def safe_get_full_optimizer_state(param, optim_state_key):
    return _owner(param).read_state(param, optim_state_key)


def safe_set_full_optimizer_state(param, value, optim_state_key):
    _owner(param).write_state(param, optim_state_key, value)


def safe_get_local_fp32_param(param):
    return _owner(param).read_local_state(param, "fp32")


def safe_set_local_fp32_param(param, value):
    _owner(param).write_local_state(param, "fp32", value)


def safe_get_local_optimizer_state(param, optim_state_key):
    return _owner(param).read_local_state(param, optim_state_key)


def safe_set_local_optimizer_state(param, value, optim_state_key):
    _owner(param).write_local_state(param, optim_state_key, value)


def _grad_owner(param, what):
    opt = _owner(param)
    if comm.get_world_size() > 1:
        raise NotImplementedError(
            f"strata.utils.{what}: with several ranks strata reduces gradients into each rank's "
            "shard in buckets, so there is no whole reduced gradient to read or write "
            "(docs/deepspeed.md)")
    return opt


def safe_get_full_grad(param):
    _grad_owner(param, "safe_get_full_grad")
    if param.grad is None:
        return None
    return param.grad.detach().to(torch.float32).clone()


def safe_set_full_grad(param, value):
    opt = _grad_owner(param, "safe_set_full_grad")
    value = torch.as_tensor(value)
    if value.numel() != param.numel():
        raise ValueError(f"strata.utils.safe_set_full_grad: needs {param.numel()} elements, got "
                         f"{value.numel()}")
    if getattr(opt, "_overlap", None) is not None:
        raise RuntimeError(
            "strata.utils.safe_set_full_grad: this step's update began during backward "
            "(strata.overlap_backward), so the gradient was consumed already; set "
            "strata.overlap_backward to false to edit gradients between backward and step")
    if param.grad is None:
        # No gradient yet this step: attach the engine's buffer views first, so the value lands
        # where the step reads it.
        opt._prepare()
    if param.grad is None:
        param.grad = value.detach().to(param.dtype).reshape(param.shape).clone()
    else:
        with torch.no_grad():
            param.grad.copy_(value.reshape(param.shape))


def safe_get_local_grad(param):
    g = safe_get_full_grad(param)
    return None if g is None else g.reshape(-1)


def safe_set_local_grad(param, value):
    safe_set_full_grad(param, value)
