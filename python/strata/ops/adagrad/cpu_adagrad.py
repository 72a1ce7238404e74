"""``DeepSpeedCPUAdagrad`` with DeepSpeed's arguments, on strata's kernels and tiers."""

from ...optim import OffloadAdagrad


class DeepSpeedCPUAdagrad(OffloadAdagrad):
    """``DeepSpeedCPUAdagrad(model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
    fp32_optimizer_states=True)``: strata's offloaded Adagrad (sparse gradients supported, as
    torch's Adagrad takes them; ``fp32_optimizer_states=False`` is refused: state is fp32)."""

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
                 fp32_optimizer_states=True, *, config=None, tag="", rank=0):
        if amsgrad:
            raise RuntimeError("DeepSpeedCPUAdagrad does not support the AMSGrad variant.")
        if not fp32_optimizer_states:
            # DeepSpeed then keeps the moments in the parameters' dtype; strata's state records
            # are fp32 only, so taking the argument would silently keep fp32 state.
            raise NotImplementedError(
                "DeepSpeedCPUAdagrad(fp32_optimizer_states=False): strata keeps optimizer state in fp32 "
                "only (16-bit state is not implemented); pass fp32_optimizer_states=True")
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay, config=config,
                         default_device="cpu", tag=tag, rank=rank)
