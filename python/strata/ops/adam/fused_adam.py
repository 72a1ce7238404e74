"""``FusedAdam`` with DeepSpeed's arguments, on strata's kernels and tiers."""

from ...optim import OffloadAdamW


class FusedAdam(OffloadAdamW):
    """``FusedAdam(params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
    adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True)``.

    A strata offloaded optimizer (AdamW with ``adam_w_mode=True``, Adam with L2 weight decay
    otherwise). As in DeepSpeed, ``amsgrad=True`` is refused. ``set_grad_none`` has no effect:
    gradients are views into strata's gradient arena and zero_grad zeroes them.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, amsgrad=False, set_grad_none=True, *,
                 config=None, tag="", rank=0):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        self._kind = "adamw" if adam_w_mode else "adam"
        self.adam_w_mode = bool(adam_w_mode)
        super().__init__(params, lr, betas, eps, weight_decay, False,
                         bias_correction=bias_correction, config=config, default_device="cpu",
                         tag=tag, rank=rank)
