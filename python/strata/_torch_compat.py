"""Small shims over torch API differences between 1.13 and 2.x."""

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype):
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"strata supports float32, bfloat16 and float16 parameters, not {dtype}"
        ) from None


_FROM_NAME = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FROM_NAME.update({v: k for k, v in DTYPE_NAMES.items()})


def dtype_from_name(name):
    """torch dtype of a name the engine or the config uses (fp32/bf16/fp16, float32, ...)."""
    try:
        return _FROM_NAME[name]
    except KeyError:
        raise TypeError(f"strata: unknown dtype name {name!r}") from None


def tensor_from_buffer(buffer, dtype):
    """A tensor viewing a writable buffer-protocol object (no copy)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older torch warns about writability on some buffers
        return torch.frombuffer(buffer, dtype=dtype)


def has_post_accumulate_grad_hook():
    return hasattr(torch.Tensor, "register_post_accumulate_grad_hook")


def torch_load_trusted(path):
    """torch.load of a file strata wrote itself (RNG states hold numpy arrays and tuples,
    which torch >= 2.6's weights_only default refuses)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13 has no weights_only
        return torch.load(path, map_location="cpu")


def note_optimizer_step(optimizer):
    """Tell torch LR schedulers built on ``optimizer`` that it stepped (strata steps the state
    itself, so the scheduler's step-order check would otherwise warn)."""
    if hasattr(optimizer, "_step_count"):
        optimizer._step_count += 1  # torch 1.x
    optimizer._opt_called = True  # torch 2.x
