"""``DeepSpeedCPUAdagrad`` with DeepSpeed's arguments, on strata's kernels and tiers."""

from ...config import warn_once
from ...optim import OffloadAdagrad


class DeepSpeedCPUAdagrad(OffloadAdagrad):
    """``DeepSpeedCPUAdagrad(model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
    fp32_optimizer_states=True)``: strata's offloaded Adagrad."""

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
                 fp32_optimizer_states=True, *, config=None, tag="", rank=0):
        if amsgrad:
            raise RuntimeError("DeepSpeedCPUAdagrad does not support the AMSGrad variant.")
        if not fp32_optimizer_states:
            warn_once("DeepSpeedCPUAdagrad(fp32_optimizer_states=False): strata keeps optimizer "
                      "state in fp32 always")
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay, config=config,
                         default_device="cpu", tag=tag, rank=rank)
