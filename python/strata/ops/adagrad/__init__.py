"""DeepSpeed's Adagrad class (``deepspeed.ops.adagrad``), mapped to strata's optimizer."""

from .cpu_adagrad import DeepSpeedCPUAdagrad  # noqa: F401
