"""``DeepSpeedCPUAdam`` with DeepSpeed's arguments, on strata's kernels and tiers."""

from ...optim import OffloadAdamW, _sixteen_bit_state


class DeepSpeedCPUAdam(OffloadAdamW):
    """``DeepSpeedCPUAdam(model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True)``.

    A strata offloaded optimizer: AdamW (decoupled weight decay) with ``adamw_mode=True``, Adam
    with L2 weight decay otherwise. ``fp32_optimizer_states=False`` (DeepSpeed: moments in the
    parameters' 16-bit dtype) stores the moments in bf16 (``strata.optimizer_state_dtype``
    bf16; the update still computes in fp32). Built directly, the state lives in pinned DRAM
    unless ``config=`` says otherwise.
    """

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True, *,
                 config=None, tag="", rank=0):
        if not fp32_optimizer_states:
            config = _sixteen_bit_state(config, "DeepSpeedCPUAdam")
        self._kind = "adamw" if adamw_mode else "adam"
        self.adam_w_mode = bool(adamw_mode)
        super().__init__(model_params, lr, betas, eps, weight_decay, amsgrad,
                         bias_correction=bias_correction, config=config, default_device="cpu",
                         tag=tag, rank=rank)
