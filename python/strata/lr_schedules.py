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
- ``LRRangeTest(optimizer, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
  lr_range_test_step_rate=1.0, lr_range_test_staircase=False, last_batch_iteration=-1)``:
  ``min_lr * (1 + step_rate * interval)``, interval ``(it + 1) / step_size`` (floored with
  staircase).
- ``OneCycle(optimizer, cycle_min_lr, cycle_max_lr, decay_lr_rate=0, cycle_first_step_size=2000,
  cycle_second_step_size=None, cycle_first_stair_count=0, cycle_second_stair_count=None,
  decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9,
  decay_mom_rate=0, last_batch_iteration=-1)``: one triangle from ``cycle_min_lr`` up to
  ``cycle_max_lr`` and back, then ``min_lr / (1 + decay_lr_rate * k / decay_step_size)``;
  with ``cycle_momentum`` (and ``betas`` in the optimizer's defaults) ``betas[0]`` moves
  inversely between ``cycle_max_mom`` and ``cycle_min_mom`` (``betas[1]`` becomes 0.99, as in
  DeepSpeed).

A learning rate held as a tensor (``lr=torch.tensor(...)``) is updated in place (``fill_``), so
code holding that tensor sees the new value, as in DeepSpeed.

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
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]


def get_torch_optimizer(optimizer):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a subclass of torch.optim.Optimizer")


def update_lr(param_groups, lrs):
    """Set each group's lr; a tensor lr is filled in place (its identity, shape and device
    kept), as DeepSpeed's update_lr does."""
    for group, lr in zip(param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr.squeeze() if torch.is_tensor(lr) else lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in param_groups]


def _as_number(value):
    return float(value) if torch.is_tensor(value) else value


def _check_warmup_type(warmup_type):
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        log.warning("strata: unknown warmup_type %r; using log (as DeepSpeed does)", warmup_type)
        return WARMUP_LOG_RATE
    return warmup_type


def _check_steps(warmup_num_steps):
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int) \
            or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")


class _Schedule:
    """What every schedule shares: its position (``last_batch_iteration``), the learning rates
    it last set, and DeepSpeed's ``state_dict`` form. Subclasses give ``get_lr`` and a ``step``
    with DeepSpeed's argument name for the class (``last_batch_iteration`` or
    ``batch_iteration``)."""

    def get_last_lr(self):
        assert self._last_lr is not None, "need to call step() first"
        return self._last_lr

    def _advance(self, iteration):
        self.last_batch_iteration = self.last_batch_iteration + 1 if iteration is None \
            else iteration
        self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}


class WarmupLR(_Schedule):
    """Warm the learning rate of each group up from ``warmup_min_lr`` to ``warmup_max_lr``
    over ``warmup_num_steps`` steps, then keep it at ``warmup_max_lr``."""

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        _check_steps(warmup_num_steps)
        self.optimizer = get_torch_optimizer(optimizer)
        if warmup_max_lr is None:
            # Each group's own lr (DeepSpeed: [group['lr'] for group in param_groups]).
            warmup_max_lr = [_as_number(g["lr"]) for g in self.optimizer.param_groups]
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

    def step(self, last_batch_iteration=None):
        self._advance(last_batch_iteration)

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


class WarmupCosineLR(_Schedule):
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

    def step(self, last_batch_iteration=None):
        self._advance(last_batch_iteration)

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]
        if self.last_batch_iteration >= 0:
            self._last_lr = update_lr(self.optimizer.param_groups, self.get_lr())


class LRRangeTest(_Schedule):
    """Learning-rate range test: raise each group's lr from ``lr_range_test_min_lr`` by
    ``lr_range_test_step_rate`` per ``lr_range_test_step_size`` steps (continuously, or in
    stairs with ``lr_range_test_staircase``)."""

    def __init__(self, optimizer, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                 lr_range_test_step_rate=1.0, lr_range_test_staircase=False,
                 last_batch_iteration=-1):
        self.optimizer = get_torch_optimizer(optimizer)
        self.min_lr = WarmupLR._format_param(self.optimizer, lr_range_test_min_lr,
                                             "lr_range_test_min_lr")
        if isinstance(lr_range_test_step_size, bool) or not isinstance(lr_range_test_step_size, int) \
                or lr_range_test_step_size <= 0:
            raise ValueError("lr_range_test_step_size must be a positive integer, got "
                             f"{lr_range_test_step_size!r}")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = bool(lr_range_test_staircase)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None
        if last_batch_iteration == -1:
            self._last_lr = update_lr(self.optimizer.param_groups, self.min_lr)

    def _interval(self):
        x = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(x) if self.staircase else x

    def get_lr(self):
        increase = 1 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]

    def step(self, batch_iteration=None):
        self._advance(batch_iteration)

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]


class OneCycle(_Schedule):
    """The 1Cycle policy: lr from ``cycle_min_lr`` up to ``cycle_max_lr`` over
    ``cycle_first_step_size`` steps and back over ``cycle_second_step_size``, then decay; the
    momentum (``betas[0]``) cycles the other way when ``cycle_momentum`` is on."""

    def __init__(self, optimizer, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0,
                 cycle_first_step_size=2000, cycle_second_step_size=None,
                 cycle_first_stair_count=0, cycle_second_stair_count=None, decay_step_size=0,
                 cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0,
                 last_batch_iteration=-1):
        self.optimizer = get_torch_optimizer(optimizer)
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        # A zero-length first half would make step_ratio 0, and the scale divides by it.
        if first <= 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {cycle_first_step_size}")
        if second < 0:
            raise ValueError("cycle_second_step_size must be non-negative, got "
                             f"{cycle_second_step_size}")
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_step_size = first
        self.second_step_size = second
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (cycle_first_stair_count if cycle_second_stair_count is None
                                   else cycle_second_stair_count)
        self.decay_step_size = decay_step_size
        self.skip_lr_decay = self.skip_mom_decay = math.isclose(decay_step_size, 0)

        # Both bounds are checked before the optimizer is touched.
        self.min_lrs = WarmupLR._format_param(self.optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = WarmupLR._format_param(self.optimizer, cycle_max_lr, "cycle_max_lr")
        if last_batch_iteration == -1:
            update_lr(self.optimizer.param_groups, self.min_lrs)
        self.decay_lr_rate = decay_lr_rate
        if math.isclose(decay_lr_rate, 0):
            self.skip_lr_decay = True

        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            if "betas" not in self.optimizer.defaults:
                log.warning("strata: OneCycle cycle_momentum is off: %s has no betas in its "
                            "defaults", type(self.optimizer).__name__)
                self.cycle_momentum = False
            else:
                self.decay_mom_rate = decay_mom_rate
                self.min_moms = [(m, 0.99) for m in WarmupLR._format_param(
                    self.optimizer, cycle_min_mom, "cycle_min_mom")]
                self.max_moms = [(m, 0.99) for m in WarmupLR._format_param(
                    self.optimizer, cycle_max_mom, "cycle_max_mom")]
                if last_batch_iteration == -1:
                    for mom, group in zip(self.min_moms, self.optimizer.param_groups):
                        group["betas"] = mom
                if math.isclose(decay_mom_rate, 0):
                    self.skip_mom_decay = True
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = None

    def _get_scale_factor(self):
        it = self.last_batch_iteration + 1
        cycle = math.floor(1 + it / self.total_size)
        x = 1.0 + it / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # Quantised from the integer offset in the cycle, not from the float scale, which
            # can land just under an exact stair at a half-cycle boundary.
            pos = it % self.total_size
            if pos <= self.first_step_size:
                stair = pos * stairs / self.first_step_size
            else:
                stair = (self.total_size - pos) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def get_lr(self):
        if self.last_batch_iteration < self.total_size:
            scale = self._get_scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        k = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * k) for lo in self.min_lrs]

    def get_mom(self):
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._get_scale_factor()
            return [(hi[0] - (hi[0] - lo[0]) * scale, lo[1])
                    for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        k = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(b0 * (1 + self.decay_mom_rate * k), b1) for b0, b1 in self.max_moms]

    def step(self, batch_iteration=None):
        self._advance(batch_iteration)
        if self.cycle_momentum:
            for group, mom in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = mom

    def load_state_dict(self, sd):
        self.last_batch_iteration = sd["last_batch_iteration"]


SCHEDULES = {LR_RANGE_TEST: LRRangeTest, ONE_CYCLE: OneCycle, WARMUP_LR: WarmupLR,
             WARMUP_DECAY_LR: WarmupDecayLR, WARMUP_COSINE_LR: WarmupCosineLR}


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
    missing = [name for name, a in accepted.items()
               if name not in ("self", "optimizer") and a.default is inspect.Parameter.empty
               and name not in params]
    if missing:
        raise ValueError(f"scheduler.params.{missing[0]}: missing; {kind} needs "
                         + ", ".join(missing))
    return SCHEDULES[kind](optimizer, **params)
