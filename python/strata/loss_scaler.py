"""fp16 loss scaling with DeepSpeed's rules.

``DynamicLossScaler`` follows DeepSpeed's (``fp16.loss_scale`` 0): the scale starts at
``2**initial_scale_power``; an overflow (inf/NaN in the gradients) skips the step and, once
``hysteresis`` overflows have been tolerated, halves the scale (not below ``min_loss_scale``);
after ``loss_scale_window`` overflow-free steps the scale doubles. With ZeRO (stage >= 1) an
overflow at the minimum scale raises, as DeepSpeed's ZeRO optimizers do ("cannot decrease scale
anymore"); at stage 0, as DeepSpeed's FP16_Optimizer, every overflow halves the scale
(``hysteresis`` unused) and the scale stays at the minimum without raising.

``LossScaler`` is a static scale (``fp16.loss_scale`` > 0). Unlike DeepSpeed, whose static
scaler never checks for overflow, strata still skips a step whose gradients are not finite
(and counts it) rather than writing NaN into the optimizer state.
"""

import logging

from . import config as _config

log = logging.getLogger("strata")


class LossScaler:
    dynamic = False

    @property
    def dynamic_loss_scale(self):  # DeepSpeed's LossScaleConfig name
        return self.dynamic

    def __init__(self, scale=1.0):
        self.cur_scale = float(scale)
        self.overflows = 0

    @property
    def loss_scale(self):
        return self.cur_scale

    def scale_loss(self, loss):
        return loss * self.cur_scale

    def update_scale(self, overflow):
        if overflow:
            self.overflows += 1

    def state_dict(self):
        return {"dynamic": False, "cur_scale": self.cur_scale, "overflows": self.overflows}

    def load_state_dict(self, sd):
        self.cur_scale = float(sd["cur_scale"])
        self.overflows = int(sd.get("overflows", 0))


class DynamicLossScaler(LossScaler):
    dynamic = True

    def __init__(self, init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                 consecutive_hysteresis=False, raise_error_at_min_scale=True, scale_factor=2.0,
                 rank0=True):
        super().__init__(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.rank0 = rank0

    def update_scale(self, overflow):
        if overflow:
            self.overflows += 1
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError(
                        "strata: fp16 gradient overflow at the minimum loss scale "
                        f"({self.min_scale:g}) - cannot decrease the scale any more; the run "
                        "has diverged (lower the learning rate, or use bf16)")
                next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                if self.rank0:
                    log.info("strata: fp16 overflow, step skipped; loss scale %g -> %g",
                             self.cur_scale, next_scale)
                self.cur_scale = next_scale
            else:
                if self.rank0:
                    log.info("strata: fp16 overflow, step skipped; loss scale %g kept "
                             "(hysteresis %d -> %d)", self.cur_scale, self.cur_hysteresis,
                             self.cur_hysteresis - 1)
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
            if stable_interval > 0 and stable_interval % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self):
        return {
            "dynamic": True,
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
            "overflows": self.overflows,
        }

    def load_state_dict(self, sd):
        self.cur_scale = float(sd["cur_scale"])
        self.cur_iter = int(sd.get("cur_iter", 0))
        self.last_overflow_iter = int(sd.get("last_overflow_iter", -1))
        self.cur_hysteresis = int(sd.get("cur_hysteresis", self.delayed_shift))
        self.overflows = int(sd.get("overflows", 0))


def from_config(cfg, rank0=True, stage=None):
    """The scaler a filled config asks for: None without fp16. At ZeRO stage 0 DeepSpeed's
    fp16 optimizer (FP16_Optimizer._update_scale) halves the scale on every overflow and stays
    at ``min_loss_scale`` without raising (``hysteresis`` is not used there); with ZeRO it
    uses the hysteresis and raises at the minimum. strata follows both."""
    get = _config.get  # a filled config; absent keys fall back to the schema's defaults
    if not get(cfg, "fp16.enabled"):
        return None
    static = float(get(cfg, "fp16.loss_scale"))
    if static > 0:
        return LossScaler(static)
    if stage is None:
        stage = int(get(cfg, "zero_optimization.stage"))
    zero0 = int(stage) == 0
    return DynamicLossScaler(
        init_scale=2.0 ** int(get(cfg, "fp16.initial_scale_power")),
        scale_window=int(get(cfg, "fp16.loss_scale_window")),
        min_scale=float(get(cfg, "fp16.min_loss_scale")),
        delayed_shift=1 if zero0 else int(get(cfg, "fp16.hysteresis")),
        consecutive_hysteresis=bool(get(cfg, "fp16.consecutive_hysteresis")),
        raise_error_at_min_scale=not zero0,
        rank0=rank0,
    )
