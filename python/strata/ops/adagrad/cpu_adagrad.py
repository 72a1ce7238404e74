"""``DeepSpeedCPUAdagrad`` with DeepSpeed's arguments, on strata's kernels and tiers."""

from ...optim import OffloadAdagrad, _sixteen_bit_state


class DeepSpeedCPUAdagrad(OffloadAdagrad):
    """``DeepSpeedCPUAdagrad(model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
    fp32_optimizer_states=True)``: strata's offloaded Adagrad (sparse gradients supported, as
    torch's Adagrad takes them; ``fp32_optimizer_states=False`` stores the sum in bf16)."""

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
                 fp32_optimizer_states=True, *, config=None, tag="", rank=0):
        if amsgrad:
            raise RuntimeError("DeepSpeedCPUAdagrad does not support the AMSGrad variant.")
        if not fp32_optimizer_states:
            config = _sixteen_bit_state(config, "DeepSpeedCPUAdagrad")
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay, config=config,
                         default_device="cpu", tag=tag, rank=rank)
