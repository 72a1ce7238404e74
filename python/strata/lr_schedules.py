"""DeepSpeed's warmup learning-rate schedules, with DeepSpeed's names, arguments and step
semantics, for any ``torch.optim.Optimizer`` (strata's or torch's).

- ``WarmupLR(optimizer, warmup_min_lr=0, warmup_max_lr=None, warmup_num_steps=1000,
  warmup_type="log", last_batch_iteration=-1)``: from ``warmup_min_lr`` to ``warmup_max_lr``
  (None: the optimizer's lr) over ``warmup_num_steps`` (at least 2) steps, then flat.
- ``WarmupDecayLR(optimizer, total_num_steps, ...)``: the same warmup, then a linear decay to 0
  at ``total_num_steps``.
- ``WarmupCosineLR(optimizer, total_num_steps, warmup_min_ratio=0, warmup_num_steps=1000,
  cos_min_ratio=1e-4, warmup_type="log", last_batch_iteration=-1)``: ratios of the optimizer's
  lr: warmup from ``warmup_min_ratio`` to 1, then a cosine to ``cos_min_ratio``.

As in DeepSpeed, building a schedule with ``last_batch_iteration=-1`` sets the learning rate to
the start of the warmup (``warmup_min_lr``; 0 for WarmupCosineLR), so the first optimizer
step runs at that rate; each ``step()`` then moves ``last_batch_iteration`` on by one.
``state_dict()`` holds ``last_batch_iteration`` only.
"""

import logging
import math

import torch

log = logging.getLogger("strata")

WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"

WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]


def get_torch_optimizer(optimizer):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a subclass of torch.optim.Optimizer")


def update_lr(param_groups, lrs):
    for group, lr in zip(param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            lr = torch.tensor([lr], device=group["lr"].device)
        group["lr"] = lr
    return [group["lr"] for group in param_groups]


def _check_warmup_type(warmup_type):
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        log.warning("strata: unknown warmup_type %r; using log (as DeepSpeed does)", warmup_type)
        return WARMUP_LOG_RATE
    return warmup_type


def _check_steps(warmup_num_steps):
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) \
            or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")


class WarmupLR:
    """Warm the learning rate of each group up from ``warmup_min_lr`` to ``warmup_max_lr``
    over ``warmup_num_steps`` steps, then keep it at ``warmup_max_lr``."""

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        _check_steps(warmup_num_steps)
        self.optimizer = get_torch_optimizer(optimizer)
        if warmup_max_lr is None:
            warmup_max_lr = self.optimizer.param_groups[0]["lr"]
            if torch.is_tensor(warmup_max_lr):
                warmup_max_lr = float(warmup_max_lr)
        self.min_lrs = self._format_param(self.optimizer, warmup_min_lr, "min_lr")
        self.max_lrs = self._format_param(self.optimizer, warmup_max_lr, "max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _check_warmup_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None
        if last_batch_iteration == -1:
            self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def get_lr(self):
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [min_lr + delta * gamma for min_lr, delta in zip(self.min_lrs, self.delta_lrs)]

    def get_last_lr(self):
        assert self._last_lr is not None, "need to call step() first"
        return self._last_lr

    def step(self, last_batch_iteration=None):
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]
        # The optimizer's lr follows the restored position (DeepSpeed leaves it to the next
        # step(); strata restores it now so a resumed step runs at the saved rate).
        if self.last_batch_iteration >= 0:
            self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def _warmup_gamma(self):
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0

    @staticmethod
    def _format_param(optimizer, value, name):
        if isinstance(value, (list, tuple)):
            if len(value) != len(optimizer.param_groups):
                raise ValueError(f"expected {len(optimizer.param_groups)} values for {name}, "
                                 f"got {len(value)}")
            return list(value)
        return [value] * len(optimizer.param_groups)


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay from ``warmup_max_lr`` to 0 at ``total_num_steps``."""

    def __init__(self, optimizer, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001,
                 warmup_num_steps=1000, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            log.warning("strata: total_num_steps %s is less than warmup_num_steps %s",
                        total_num_steps, warmup_num_steps)

    def _get_gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR:
    """Warm up from ``warmup_min_ratio`` x lr to lr over ``warmup_num_steps``, then follow a
    cosine down to ``cos_min_ratio`` x lr at ``total_num_steps`` (and stay there)."""

    def __init__(self, optimizer, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        _check_steps(warmup_num_steps)
        self.optimizer = get_torch_optimizer(optimizer)
        self.total_num_steps = total_num_steps
        self.last_batch_iteration = last_batch_iteration
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = _check_warmup_type(warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            log.warning("strata: total_num_steps %s is less than warmup_num_steps %s",
                        total_num_steps, warmup_num_steps)
        self.org_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._last_lr = None
        if last_batch_iteration == -1:
            self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def get_lr_ratio(self):
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            if self.warmup_type == WARMUP_LOG_RATE:
                ratio = self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
            else:
                ratio = self.last_batch_iteration / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = self.last_batch_iteration - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def get_lr(self):
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]

    def get_last_lr(self):
        assert self._last_lr is not None, "need to call step() first"
        return self._last_lr

    def step(self, last_batch_iteration=None):
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]
        if self.last_batch_iteration >= 0:
            self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())


SCHEDULES = {WARMUP_LR: WarmupLR, WARMUP_DECAY_LR: WarmupDecayLR, WARMUP_COSINE_LR: WarmupCosineLR}


def from_config(optimizer, cfg):
    """The schedule a filled config names (``scheduler.type``/``params``), or None."""
    section = cfg.get("scheduler") if isinstance(cfg, dict) else None
    if not section:
        return None
    kind = section.get("type")
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler.type: {kind!r} is not one of {', '.join(SCHEDULES)}")
    params = {k: v for k, v in (section.get("params") or {}).items() if v is not None}
    import inspect

    accepted = inspect.signature(SCHEDULES[kind].__init__).parameters
    params = {k: v for k, v in params.items() if k in accepted}
    return SCHEDULES[kind](optimizer, **params)
