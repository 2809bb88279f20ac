"""Every switch of the patched llama.cpp that changes what a TQ cache stores or computes, listed
once with its default: the per-context TQ cache options and the measurement knobs.

Options (protected layers, key centering, exact sink) are per-context cache options like -ctk
(patches/0008): on llama.cpp's command line `--tq-protect-layers N`, `--tq-key-means FILE` and
`--no-tq-exact-sink`; fields `tq_protect_layers`, `tq_key_means` and `tq_exact_sink` of
llama_context_params and keyword arguments of llama-cpp-python's Llama. tq's own commands take
`--tq-protect-layers N`, `--tq-key-center on|off` and `--tq-exact-sink on|off`; key centering on
means the model's mean keys from `tq calibrate` (calibrated on first use), which llama.cpp itself
only uses when given the file.

Knobs are environment variables read by the library for measurements and A/B runs
(LLAMA_ATTN_ROT_DISABLE, TQ_ATTN_ROWS, TQ_SCALE_SEARCH, TQ_NORM_CORRECTION, TQ_CPU_SIMD; ggml_tq
reads its own in tq_knobs()); they stay environment variables.

A "setting" is a dict {switch name: value} of every switch (see `from_env`, `apply_args`): the
value llama.cpp uses, parsed the way llama.cpp parses it (C atoi).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .arguments import int_arg
from .cache_types import KEY_ONLY_NAMES, SPLIT_NAMES, is_tq

Value = int | bool | str | None


def c_atoi(text: str | None) -> int:
    """C atoi, as llama.cpp reads its switches: the leading integer, 0 when there is none."""
    m = re.match(r"\s*([-+]?\d+)", text or "")
    return int(m.group(1)) if m else 0


def _has_tq(k: str, v: str) -> bool:
    return is_tq(k) or is_tq(v)


def _has_mse_tq(k: str, v: str) -> bool:
    return any(is_tq(t) and "qjl" not in t for t in (k, v))


def _attn_rot_matters(k: str, v: str, setting: Mapping[str, Value]) -> bool:
    # llama.cpp's Hadamard rotation of the graph applies to quantized non-TQ types only (TQ types
    # rotate inside each block)
    return any(t not in ("f16", "bf16", "f32") and not is_tq(t) for t in (k, v))


@dataclass(frozen=True)
class Switch:
    name: str                   # the key in a setting and in results files
    env: str | None             # the environment variable the library reads (knobs; options have none)
    default: Value
    kind: str                   # "int", "on" (on/off switch, atoi != 0), "text"
    option: bool                # a per-context llama.cpp cache option (else a measurement knob)
    matters: Callable[[str, str, Mapping[str, Value]], bool]   # does it change a K/V pair's result
    help: str

    @property
    def flag(self) -> str | None:
        """llama.cpp's (and tq's) command-line flag of an option."""
        return "--tq-" + self.name.replace("_", "-") if self.option else None

    @property
    def param(self) -> str | None:
        """llama_context_params field and llama-cpp-python keyword argument of an option."""
        return "tq_" + self.name if self.option else None

    def parse_env(self, text: str | None) -> Value:
        """The value llama.cpp uses when the variable holds text (None: unset)."""
        if text is None:
            return self.default
        if self.kind == "int":
            return max(0, c_atoi(text))
        if self.kind == "on":
            return c_atoi(text) != 0
        return text

    def env_text(self, value: Value) -> str:
        if self.kind == "on":
            return "1" if value else "0"
        return str(value)

    def show(self, value: Value) -> str:
        """The value as results files and commands write it: on/off, a number, a name."""
        if self.kind == "on":
            return "on" if value else "off"
        return str(value)


# The order is the order of the parts of a results row's variant ("norm_correction=off,...").
SWITCHES: tuple[Switch, ...] = (
    Switch("norm_correction", "TQ_NORM_CORRECTION", True, "on", False, lambda k, v, s: _has_tq(k, v),
           "the reference quantizer rescales a block's norm to its reconstruction's"),
    Switch("scale_search", "TQ_SCALE_SEARCH", True, "on", False, lambda k, v, s: _has_mse_tq(k, v),
           "the reference quantizer searches the block scale"),
    Switch("key_center", None, True, "on", True, lambda k, v, s: is_tq(k) and k not in KEY_ONLY_NAMES,
           "TQ K layers store k - m, m the model's mean key (`tq calibrate`)"),
    Switch("exact_sink", None, True, "on", True, lambda k, v, s: _has_tq(k, v),
           "TQ layers keep each stream's first K and V rows in float32"),
    Switch("attn_rot", "LLAMA_ATTN_ROT_DISABLE", True, "on", False, _attn_rot_matters,
           "llama.cpp's Hadamard rotation of quantized caches (LLAMA_ATTN_ROT_DISABLE=1 turns it off)"),
    Switch("protect_layers", None, 1, "int", True, lambda k, v, s: _has_tq(k, v),
           "the first and last N layers of a TQ cache are kept at q8_0"),
    Switch("attn_rows", "TQ_ATTN_ROWS", True, "on", False, lambda k, v, s: _has_tq(k, v),
           "TQ attention reads the cache in tiles of query rows"),
    Switch("cpu_simd", "TQ_CPU_SIMD", None, "text", False, lambda k, v, s: False,
           "caps the TQ CPU kernels' SIMD level (scalar, avx2, avx512, neon); results are bit-identical"),
)
BY_NAME: dict[str, Switch] = {s.name: s for s in SWITCHES}
OPTIONS: tuple[Switch, ...] = tuple(s for s in SWITCHES if s.option)
ENV_NAMES: tuple[str, ...] = tuple(s.env for s in SWITCHES if s.env)


def _value_from_env(switch: Switch, text: str | None) -> Value:
    if switch.env is None:          # an option: set on the command line or by keyword, never by the environment
        return switch.default
    if switch.name == "attn_rot":   # the variable says "disable": on unless set to a non-zero number
        return text is None or c_atoi(text) == 0
    return switch.parse_env(text)


def _env_from_value(switch: Switch, value: Value) -> str:
    if switch.name == "attn_rot":
        return "0" if value else "1"
    return switch.env_text(value)


def defaults() -> dict[str, Value]:
    return {s.name: s.default for s in SWITCHES}


def env_texts(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The switches' environment variables as set (None: unset), as results files record them."""
    environ = os.environ if environ is None else environ
    return {s.env: environ.get(s.env) for s in SWITCHES if s.env}


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Value]:
    """The setting llama.cpp uses under these environment variables."""
    environ = os.environ if environ is None else environ
    return {s.name: _value_from_env(s, environ.get(s.env) if s.env else None) for s in SWITCHES}


# the environment variables llama.cpp read the options from before they were options (patches/0008);
# results files made then recorded them
RECORDED_OPTION_ENV = {"TQ_PROTECT_LAYERS": "protect_layers", "TQ_KEY_CENTER": "key_center", "TQ_EXACT_SINK": "exact_sink"}


def from_recorded_env(env: Mapping[str, str]) -> dict[str, Value]:
    """The setting of a results row recorded when the options were environment variables."""
    setting = from_env(env)
    for var, name in RECORDED_OPTION_ENV.items():
        if env.get(var) is not None:
            setting[name] = BY_NAME[name].parse_env(env[var])
    return setting


def non_default(setting: Mapping[str, Value]) -> dict[str, Value]:
    return {s.name: setting[s.name] for s in SWITCHES if setting.get(s.name, s.default) != s.default}


def variant(k: str, v: str, setting: Mapping[str, Value]) -> str:
    """The switches that differ from their defaults and change this pair's result, e.g.
    "key_center=off,protect_layers=0"; "" for the default behaviour."""
    return ",".join(f"{s.name}={s.show(setting[s.name])}" for s in SWITCHES
                    if s.name in non_default(setting) and s.matters(k, v, setting))


def describe(setting: Mapping[str, Value]) -> dict[str, str | int | None]:
    """Every switch and its value, as a results file records them."""
    return {s.name: (setting[s.name] if s.kind == "int" or setting[s.name] is None else s.show(setting[s.name]))
            for s in SWITCHES}


# --- what a child process gets ------------------------------------------------------------------------


def child_env(setting: Mapping[str, Value], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a llama.cpp process (or of this one, for llama-cpp-python) with this
    setting's knobs set or removed (options go on the command line: llama_args)."""
    env = dict(os.environ if environ is None else environ)
    for s in SWITCHES:
        if s.env is None:
            continue
        value = setting.get(s.name, s.default)
        if value == s.default or value is None:
            env.pop(s.env, None)
        else:
            env[s.env] = _env_from_value(s, value)
    return env


def _key_means(setting: Mapping[str, Value], model: str | Path | None, k: str | None,
               n_ctx: int | None = None) -> Path | None:
    """The calibration file a TQ K cache of this model uses under this setting (None: not centred):
    the key means, or for tq3c keys (which need theirs, centering or not) the tq3c transforms for a
    cache of n_ctx positions (None: calibrate.TQ3C_CTX), for tq2o/tq3o keys the outlier-split ones."""
    from .calibrate import key_means, split_transforms, tq3c_ctx_for, tq3c_transforms

    if model is not None and k == "tq3c":
        return tq3c_transforms(model, tq3c_ctx_for(n_ctx))
    if model is not None and k in SPLIT_NAMES:
        return split_transforms(model)
    if not setting.get("key_center", True) or model is None or (k is not None and not is_tq(k)):
        return None
    return key_means(model)


def llama_args(setting: Mapping[str, Value], model: str | Path | None = None, k: str | None = None,
               n_ctx: int | None = None) -> list[str]:
    """llama.cpp's command-line arguments for the options: where llama.cpp's default differs from
    the setting (key centering needs the model's mean keys: none is passed for a K type that is not
    TQ, or without a model; tq3c keys get the transforms for n_ctx positions)."""
    args: list[str] = []
    means = _key_means(setting, model, k, n_ctx)
    if means is not None:
        args += ["--tq-key-means", str(means)]
    if not setting.get("exact_sink", True):
        args += ["--no-tq-exact-sink"]
    protect = setting.get("protect_layers", 1)
    if protect != BY_NAME["protect_layers"].default:
        args += ["--tq-protect-layers", str(protect)]
    return args


def llama_kwargs(setting: Mapping[str, Value], model: str | Path | None = None, k: str | None = None,
                 n_ctx: int | None = None) -> dict:
    """llama-cpp-python's Llama keyword arguments for the options (patches/llama-cpp-python)."""
    means = _key_means(setting, model, k, n_ctx)
    return {"tq_protect_layers": int(setting.get("protect_layers", 1)),
            "tq_key_means": str(means) if means is not None else None,
            "tq_exact_sink": bool(setting.get("exact_sink", True))}


def option_kwargs(setting: Mapping[str, Value]) -> dict:
    """tq's option keyword arguments (load_llama) of a setting: tq_protect_layers, tq_key_center, tq_exact_sink."""
    return {s.param: setting.get(s.name, s.default) for s in OPTIONS}


def setting_from_kwargs(kwargs: dict) -> dict[str, Value]:
    """Takes tq's option keyword arguments (tq_protect_layers, tq_key_center, tq_exact_sink) out of
    kwargs, checked, and returns the setting they make with the environment's knobs."""
    setting = from_env()
    for s in OPTIONS:
        if s.param not in kwargs:
            continue
        value = kwargs.pop(s.param)
        if s.kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{s.param} must be a whole number of 0 or more, not {value!r}")
        if s.kind == "on" and not isinstance(value, bool):
            raise ValueError(f"{s.param} must be True or False, not {value!r}")
        setting[s.name] = value
    return setting


# --- tq's own command line ---------------------------------------------------------------------------


def _on_off(text: str) -> bool:
    t = text.strip().lower()
    if t in ("on", "1", "true", "yes"):
        return True
    if t in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not on or off")


def add_option_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """--tq-protect-layers, --tq-key-center, --tq-exact-sink, or those of `names` (default: the
    environment variable, else the built-in default)."""
    for s in OPTIONS:
        if names is not None and s.name not in names:
            continue
        default = s.show(s.default)
        if s.kind == "int":
            parser.add_argument(s.flag, type=int_arg(0, what="a layer count"), default=None, metavar="N", help=f"{s.help} (default: {default})")
        else:
            parser.add_argument(s.flag, type=_on_off, default=None, metavar="on|off", help=f"{s.help} (default: {default})")


def apply_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Value]:
    """The setting of a tq command: the environment's, with the options given on tq's command line."""
    setting = from_env(environ)
    for s in OPTIONS:
        value = getattr(args, s.flag[2:].replace("-", "_"), None)
        if value is not None:
            setting[s.name] = value
    return setting


def command_prefix(setting: Mapping[str, Value]) -> str:
    """"VAR=value " for each knob that differs from its default, to put before a recorded command."""
    knobs = [s for s in SWITCHES if not s.option and s.name in non_default(setting)]
    return "".join(f"{s.env}={shlex.quote(_env_from_value(s, setting[s.name]))} " for s in knobs)


def command_options(setting: Mapping[str, Value]) -> list[str]:
    """tq's arguments for the options that differ from their defaults (what a recorded command adds)."""
    out: list[str] = []
    for s in OPTIONS:
        if s.name in non_default(setting):
            out += [s.flag, s.show(setting[s.name])]
    return out


def tq_command(parts: list[str], setting: Mapping[str, Value]) -> str:
    """The shell command that makes a result again: knobs as variables, options as tq arguments."""
    return command_prefix(setting) + shlex.join(parts + command_options(setting))
