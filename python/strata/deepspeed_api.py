"""DeepSpeed's entry points: ``initialize``, ``add_config_arguments``, ``init_distributed``.

``import strata as deepspeed`` makes a DeepSpeed training script run on strata:

    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters())

The config comes, as in DeepSpeed, from ``config`` (a path or a dict), ``config_params`` (the old
name of the same), or ``args.deepspeed_config`` (giving two of them is an error). strata also
accepts no config at all (every default: fp32, state with the model, no schedule).

``"auto"`` values (Hugging Face style) are resolved before the config is validated:

- batch keys: ``train_micro_batch_size_per_gpu`` from ``args.per_device_train_batch_size``
  (or ``args.train_micro_batch_size_per_gpu`` / ``micro_batch_size`` / ``batch_size``),
  ``gradient_accumulation_steps`` from ``args.gradient_accumulation_steps``,
  ``train_batch_size`` from ``args.train_batch_size``; one of the three may instead follow from
  the other two;
- ``optimizer.params.lr``/``betas``/``eps``/``weight_decay`` from ``args.learning_rate`` (or
  ``lr``), ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``, else from a client
  optimizer's defaults;
- ``scheduler.params.warmup_min_lr`` is 0 (what Hugging Face writes),
  ``warmup_max_lr`` is the optimizer's lr, ``warmup_num_steps`` from ``args.warmup_steps``
  (or ``warmup_ratio`` x ``max_steps``), ``total_num_steps`` from ``args.max_steps``;
- ``gradient_clipping`` from ``args.max_grad_norm`` (or ``gradient_clipping``);
- ``fp16.enabled``/``bf16.enabled`` from ``args.fp16``/``args.bf16``, else from the model's
  dtype.

A key that is still "auto" after that is an error naming it.
"""

import math
import os

import torch

from . import comm
from . import config as _config


def add_config_arguments(parser):
    """Add DeepSpeed's command-line arguments: ``--deepspeed``, ``--deepspeed_config``
    (and the deprecated ``--deepscale``/``--deepscale_config``), and ``--local_rank`` when the
    parser has none yet (the parser then resolves a later ``--local_rank`` of the script's own
    by replacing this one, instead of failing)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations (strata)")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (strata: accepted; strata is always on)")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated: use --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated: use --deepspeed_config")
    if "--local_rank" not in parser._option_string_actions:
        group.add_argument("--local_rank", type=int,
                           default=int(os.environ.get("LOCAL_RANK", -1)),
                           help="local rank passed from distributed launcher")
        # argparse hands optionals to its groups, each with its own copy of the handler.
        for container in [parser] + list(getattr(parser, "_action_groups", [])):
            container.conflict_handler = "resolve"
    return parser


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=29500,
                     verbose=True, timeout=None, init_method=None, dist_init_required=None,
                     config=None, rank=-1, world_size=-1):
    """``deepspeed.init_distributed``: see ``strata.comm.init_distributed``."""
    kwargs = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return comm.init_distributed(dist_backend=dist_backend, auto_mpi_discovery=auto_mpi_discovery,
                                 distributed_port=distributed_port, verbose=verbose,
                                 init_method=init_method, dist_init_required=dist_init_required,
                                 config=config, rank=rank, world_size=world_size, **kwargs)


def _arg(args, *names):
    for n in names:
        v = getattr(args, n, None) if args is not None else None
        if v is not None:
            return v
    return None


def _model_dtype(model):
    if model is None:
        return None
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def auto_values(args=None, model=None, optimizer=None):
    """What ``"auto"`` keys resolve to, from the script's arguments, the client optimizer and
    the model (see the module doc). Keys with nothing to resolve from are left out."""
    out = {}

    def put(key, value):
        if value is not None:
            out[key] = value

    put("train_micro_batch_size_per_gpu",
        _arg(args, "per_device_train_batch_size", "train_micro_batch_size_per_gpu",
             "micro_batch_size", "batch_size"))
    put("gradient_accumulation_steps", _arg(args, "gradient_accumulation_steps"))
    put("train_batch_size", _arg(args, "train_batch_size"))
    put("gradient_clipping", _arg(args, "max_grad_norm", "gradient_clipping"))

    defaults = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        defaults = optimizer.defaults
    lr = _arg(args, "learning_rate", "lr")
    if lr is None:
        lr = defaults.get("lr")
    put("optimizer.params.lr", lr)
    b1, b2 = _arg(args, "adam_beta1"), _arg(args, "adam_beta2")
    if b1 is not None and b2 is not None:
        put("optimizer.params.betas", [b1, b2])
    elif "betas" in defaults:
        put("optimizer.params.betas", list(defaults["betas"]))
    eps = _arg(args, "adam_epsilon")
    put("optimizer.params.eps", eps if eps is not None else defaults.get("eps"))
    wd = _arg(args, "weight_decay")
    put("optimizer.params.weight_decay", wd if wd is not None else defaults.get("weight_decay"))

    put("scheduler.params.warmup_min_lr", 0)
    put("scheduler.params.warmup_max_lr", lr)
    max_steps = _arg(args, "max_steps")
    if max_steps is not None and max_steps > 0:
        put("scheduler.params.total_num_steps", int(max_steps))
    warmup = _arg(args, "warmup_steps")
    if (warmup is None or warmup == 0) and max_steps and _arg(args, "warmup_ratio"):
        warmup = math.ceil(max_steps * _arg(args, "warmup_ratio"))
    if warmup is not None and warmup > 0:
        put("scheduler.params.warmup_num_steps", int(warmup))

    dtype = _model_dtype(model)
    fp16 = _arg(args, "fp16")
    bf16 = _arg(args, "bf16")
    put("fp16.enabled", bool(fp16) if isinstance(fp16, bool) else
        (dtype == torch.float16 if dtype is not None else None))
    put("bf16.enabled", bool(bf16) if isinstance(bf16, bool) else
        (dtype == torch.bfloat16 if dtype is not None else None))
    return out


def _resolve_config(args, config, config_params):
    if config is None and config_params is not None:
        config = config_params
    if args is not None and getattr(args, "deepscale_config", None) is not None:
        _config.warn_once("--deepscale_config is deprecated, use --deepspeed_config")
        if getattr(args, "deepspeed_config", None) is not None:
            raise ValueError("strata.initialize: given both --deepscale_config and "
                             "--deepspeed_config; keep one")
        args.deepspeed_config = args.deepscale_config
        args.deepscale_config = None
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("strata.initialize: a config was given both in the arguments "
                             "(--deepspeed_config) and to initialize(config=...); keep one "
                             "(as DeepSpeed requires)")
        config = args.deepspeed_config
    return config


def initialize(args=None, model=None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port=29500, mpu=None,
               dist_init_required=None, collate_fn=None, config=None, config_params=None,
               **kwargs):
    """Build a strata ``Engine`` the way ``deepspeed.initialize`` builds its engine.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``: the engine, its
    optimizer (a strata optimizer, or the client optimizer when strata cannot offload it), a
    DataLoader over ``training_data`` with ``train_micro_batch_size_per_gpu`` (or None), and
    the schedule (or None).
    """
    from .engine import Engine

    if model is None:
        # DeepSpeed: assert model is not None, "deepspeed.initialize requires a model"
        raise _config.DeepSpeedAssertion("strata.initialize: a model is required")
    if mpu is not None:
        _config.warn_once("initialize(mpu=...): model parallelism is not implemented; the "
                          "model-parallel unit is ignored and every rank is data-parallel")
    for k in kwargs:
        _config.warn_once(f"initialize({k}=...): not used by strata")
    comm.init_distributed(distributed_port=distributed_port,
                          dist_init_required=dist_init_required)
    cfg_source = _resolve_config(args, config, config_params)
    cfg = _config.load_config(cfg_source,
                              auto_values=auto_values(args, model,
                                                      optimizer if isinstance(
                                                          optimizer, torch.optim.Optimizer)
                                                      else None),
                              world_size=comm.get_world_size())
    if cfg_source is not None:
        for message in _config.deepspeed_differences(cfg, _config._read(cfg_source)):
            _config.warn_once(f"{message} (docs/deepspeed.md)")
    # zero_optimization.stage 3 is warned about once by the config parser: parameters stay
    # whole, the optimizer state is offloaded as at stage 2.
    engine = Engine(module=model, config=cfg, optimizer=optimizer,
                    model_parameters=model_parameters, lr_scheduler=lr_scheduler,
                    training_data=training_data, collate_fn=collate_fn, args=args)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler

