"""Configuration: DeepSpeed-style JSON validated by strata's one C++ schema.

``load_config`` accepts a path, a dict or None and returns the config with every default
filled in: a dict (``FilledConfig``) that also carries the parsed C++ configuration
(``.handle``, a ``strata._C.Config``), which is what the engine is given — the JSON is parsed
once, and defaults live in the C++ schema only (``get`` falls back to it). Errors raise ``strata.ConfigError`` (a ValueError) naming the JSON path, the bad
value and what is allowed. Warnings (unknown keys, keys accepted but not acted on) are logged
once per process.
"""

import json
import logging
import os

from . import _C

log = logging.getLogger("strata")
_warned = set()


class DeepSpeedAssertion(AssertionError, ValueError):
    """A refusal DeepSpeed makes with ``assert`` (so scripts and tests that expect its
    AssertionError see one), which strata's own callers may catch as a ValueError."""


def warn_once(message):
    if message in _warned:
        return
    _warned.add(message)
    # With no logging configured, Python's last-resort handler prints it to stderr.
    log.warning("strata: %s", message)


def _text(config):
    """(JSON text, name for messages). Files are parsed by the C++ parser itself, so
    comments and a byte-order mark are accepted and syntax errors name line and column."""
    if config is None:
        return "{}", "config"
    if isinstance(config, dict):
        try:
            return json.dumps(config, allow_nan=False), "config"
        except ValueError as exc:
            raise _C.ConfigError(f"config holds a value JSON cannot express: {exc}") from exc
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", errors="replace"), path
        except OSError as exc:
            raise _C.ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    raise _C.ConfigError(f"config must be a path, a dict or None, not {type(config).__name__}")


def _read(config):
    """The user's config as a dict (not validated, no defaults)."""
    if isinstance(config, dict):
        return json.loads(_text(config)[0])
    text, name = _text(config)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _strip_comments_and_load(text, name)


def _strip_comments_and_load(text, name):
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        else:
            out.append(c)
        i += 1
    try:
        return json.loads("".join(out).lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise _C.ConfigError(f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


class FilledConfig(dict):
    """A config with every default filled in (a plain dict to read), and ``handle``: the
    parsed C++ configuration the engine reads its typed fields from. Treat it as read-only:
    the handle does not see later changes to the dict."""

    __slots__ = ("handle",)

    def __copy__(self):
        out = FilledConfig(self)
        out.handle = self.handle
        return out

    def __deepcopy__(self, memo):
        import copy

        out = FilledConfig(copy.deepcopy(dict(self), memo))
        out.handle = self.handle  # immutable: shared
        return out

    def __reduce__(self):  # pickles as the plain dict
        return (dict, (dict(self),))


def parse(config=None, *, auto_values=None, world_size=1, quiet=False, check_paths=True):
    """Validate and fill a config; returns the parsed handle (``strata._C.Config``)."""
    text, name = _text(config)
    handle = _C.Config.parse(text, json.dumps(auto_values or {}), int(world_size),
                             bool(check_paths), name)
    if not quiet:
        for w in handle.warnings:
            warn_once(w)
    return handle


def load_config(config=None, *, auto_values=None, world_size=1, quiet=False, check_paths=True):
    """Validate and fill a config. Returns a dict (``FilledConfig``, with the parsed handle).

    check_paths=False skips the checks of paths on this machine (nvme_path), for tools that
    inspect a config meant for another machine.
    """
    handle = parse(config, auto_values=auto_values, world_size=world_size, quiet=quiet,
                   check_paths=check_paths)
    out = FilledConfig(json.loads(handle.json()))
    out.handle = handle
    return out


def handle_of(cfg, *, world_size=1):
    """The parsed handle of ``cfg``: its own when it came from ``load_config``, else ``cfg``
    (a plain dict) parsed now."""
    if isinstance(cfg, FilledConfig):
        return cfg.handle
    return parse(cfg, world_size=world_size, quiet=True)


_NO_DEFAULT = object()
_schema_defaults = None


def schema_default(path):
    """The schema's default of ``path`` (None when it has none, or for a type-dependent one)."""
    global _schema_defaults
    if _schema_defaults is None:
        _schema_defaults = {r["path"]: r["default"] for r in schema()}
    return _schema_defaults.get(path)


def get(cfg, path, default=_NO_DEFAULT):
    """The value at dotted ``path``; when absent or null, ``default`` if given, else the
    schema's default (the one default of every key)."""
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if node is not None:
        return node
    return schema_default(path) if default is _NO_DEFAULT else default


def set_path(cfg, path, value):
    parts = path.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def schema():
    """The schema table: a list of dicts (path, type, default, description, ...)."""
    rows = _C.config_schema()
    for r in rows:
        if r["default"] is not None:
            r["default"] = json.loads(r["default"])
    return rows


def deepspeed_differences(cfg, user=None):
    """Messages for keys of a filled config that strata accepts and acts on differently from
    DeepSpeed (docs/deepspeed.md, "Differences"); keys accepted but not acted on at all are
    warned about by the parser itself. ``user``: the config as written (to tell given keys
    from filled defaults); None reads given-ness from the filled config."""
    src = user if isinstance(user, dict) else cfg
    out = []
    stage = int(get(cfg, "zero_optimization.stage"))
    fp16 = get(src, "fp16") or {}
    if get(cfg, "fp16.enabled") and stage == 0 and not get(cfg, "fp16.loss_scale"):
        given = [k for k in ("hysteresis", "consecutive_hysteresis") if k in fp16]
        if given:
            out.append(f"fp16.{', fp16.'.join(given)}: not used at ZeRO stage 0 (as in "
                       "DeepSpeed's FP16_Optimizer, every overflow halves the scale, and the "
                       "scale stays at min_loss_scale without an error)")
    accum = get(cfg, "data_types.grad_accum_dtype")
    low = get(cfg, "bf16.enabled") or get(cfg, "fp16.enabled")
    if stage == 0 and low and str(accum).lower() in ("fp32", "float32"):
        out.append("data_types.grad_accum_dtype = fp32 with a 16-bit model at ZeRO stage 0: "
                   "strata accumulates in fp32 (one process); DeepSpeed refuses this mix")
    if get(cfg, "optimizer.type") in ("Adam", "AdamW") and get(cfg, "optimizer.params.amsgrad"):
        out.append("optimizer.params.amsgrad = true: strata runs AMSGrad on its own "
                   "OffloadAdamW/OffloadAdam; DeepSpeed's FusedAdam and CPU Adam refuse it")
    # optimizer.params.torch_adam is warned about by the parser (accepted, not acted on).
    return out
