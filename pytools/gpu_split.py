"""How the offloaded layers are shared among several GPUs: llama.cpp's --split-mode (-sm),
--tensor-split (-ts) and --main-gpu (-mg), for the `tq` commands that offload layers and for
load_llama.

    tq run --gpu-layers 99 --split-mode layer --tensor-split 3,1    # llama-completion -ngl 99 -sm layer -ts 3,1
    load_llama("smollm2", n_gpu_layers=99, split_mode="layer", tensor_split=[3, 1])

An option reaches llama.cpp only when it is given: llama.cpp's defaults (layer split, shares by
each device's free memory, GPU 0) stay its own. With a layer split each GPU holds its layers and
their KV cache, TQ types included. What the pinned llama.cpp (common/arg.cpp, src/llama.cpp,
src/llama-model.cpp) would take without a word but not act on is refused here:

- any of them with no layer offloaded: the split has nothing to share;
- --split-mode row: ggml-cuda and ggml-rpc offer no split buffer type any more, and model loading
  stops with "device CUDA0 does not support split buffers" (llama-model.cpp, make_gpu_buft_list);
- --main-gpu without --split-mode none: llama.cpp reads it only to pick the one device of
  split mode none;
- --tensor-split with --split-mode none: one device takes everything.

With --rpc the RPC servers come first in llama.cpp's device list: --tensor-split's proportions and
--main-gpu's index count them before the local GPUs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .arguments import int_arg
from .errors import UserError

SPLIT_MODES = ("none", "layer", "row")
# common/arg.cpp refuses a -ts list of llama_max_devices() (16) entries or more
MAX_TENSOR_SPLIT = 15
ROW_UNSUPPORTED = ("the pinned llama.cpp has no row split for CUDA or RPC devices (ggml-cuda and ggml-rpc offer "
                   "no split buffer type; model loading would stop with \"device CUDA0 does not support split "
                   "buffers\")")


class SplitError(UserError, ValueError):
    """A split setting that cannot work: a UserError for tq's commands, a ValueError for
    load_llama's callers (what it raises for other bad arguments)."""


@dataclass(frozen=True)
class Spelling:
    """How the options are named where an error message points to them."""
    split_mode: str
    tensor_split: str
    main_gpu: str
    gpu_layers: str


CLI = Spelling("--split-mode", "--tensor-split", "--main-gpu", "--gpu-layers (-ngl)")
PYTHON = Spelling("split_mode", "tensor_split", "main_gpu", "n_gpu_layers")


@dataclass(frozen=True)
class GpuSplit:
    """The split options as given; None: not given (llama.cpp's default)."""
    mode: str | None = None
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int | None = None

    def given(self, spelling: Spelling = CLI) -> list[str]:
        """The names of the options that were given."""
        values = ((spelling.split_mode, self.mode), (spelling.tensor_split, self.tensor_split),
                  (spelling.main_gpu, self.main_gpu))
        return [name for name, value in values if value is not None]


def _number_text(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


def parse_tensor_split(value: str | Sequence[float]) -> tuple[float, ...]:
    """'3,1' (or a sequence of numbers): one non-negative proportion per device, in llama.cpp's
    device order; ValueError saying what is wrong."""
    if isinstance(value, str):
        items: list = value.split(",")
        try:
            numbers = [float(item) for item in items]
        except ValueError:
            raise ValueError(f"tensor split '{value}': give comma-separated proportions such as 3,1") from None
    else:
        numbers = list(value)
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers):
            raise ValueError(f"tensor split {value!r}: give numbers, one proportion per device, such as [3, 1]")
        numbers = [float(x) for x in numbers]
    if not numbers:
        raise ValueError("tensor split: no proportion given; give one per device, such as 3,1")
    if len(numbers) > MAX_TENSOR_SPLIT:
        raise ValueError(f"tensor split of {len(numbers)} devices: llama.cpp takes at most {MAX_TENSOR_SPLIT}")
    if any(not math.isfinite(x) or x < 0 for x in numbers):
        raise ValueError(f"tensor split {value if isinstance(value, str) else list(value)}: "
                         "each proportion must be a finite number of 0 or more")
    if not any(numbers):
        # all zeros is llama.cpp's "not given" (shares by free memory): not what someone who wrote it meant
        raise ValueError("tensor split: every proportion is 0; give at least one device a share, such as 1,0")
    return tuple(numbers)


def tensor_split_arg(text: str) -> tuple[float, ...]:
    """argparse type of --tensor-split."""
    try:
        return parse_tensor_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_split_arguments(p: argparse.ArgumentParser, needs: str = "--gpu-layers") -> None:
    """--split-mode, --tensor-split and --main-gpu; needs: the option that offloads layers."""
    p.add_argument("--split-mode", "-sm", choices=SPLIT_MODES, default=None,
                   help="how the offloaded layers are shared among several GPUs (llama.cpp's -sm; with " + needs +
                        "): layer (llama.cpp's default: each GPU takes whole layers and their KV cache), none "
                        "(one GPU, --main-gpu); row is refused: this llama.cpp has no row split on CUDA")
    p.add_argument("--tensor-split", "-ts", type=tensor_split_arg, default=None, metavar="N0,N1,...",
                   help="each GPU's proportion of the offloaded layers, comma-separated, e.g. 3,1 "
                        "(llama.cpp's -ts; default: by free memory)")
    p.add_argument("--main-gpu", "-mg", type=int_arg(0, what="a GPU index"), default=None, metavar="INDEX",
                   help="the GPU of --split-mode none (llama.cpp's -mg; default 0)")


def split_from_args(args: argparse.Namespace) -> GpuSplit:
    return GpuSplit(args.split_mode, args.tensor_split, args.main_gpu)


def split_from_kwargs(split_mode: str | None, tensor_split: str | Sequence[float] | None,
                      main_gpu: int | None) -> GpuSplit:
    """load_llama's split arguments, checked one by one (SplitError)."""
    if split_mode is not None and split_mode not in SPLIT_MODES:
        raise SplitError(f"split_mode {split_mode!r}: give one of {', '.join(SPLIT_MODES)}")
    if main_gpu is not None and (isinstance(main_gpu, bool) or not isinstance(main_gpu, int) or main_gpu < 0):
        raise SplitError(f"main_gpu {main_gpu!r}: give a GPU index of 0 or more")
    try:
        shares = None if tensor_split is None else parse_tensor_split(tensor_split)
    except ValueError as exc:
        raise SplitError(str(exc)) from None
    return GpuSplit(split_mode, shares, main_gpu)


def check_split(split: GpuSplit, offloaded: bool, rpc: bool = False, spelling: Spelling = CLI,
                offload_hint: str | None = None) -> None:
    """SplitError for a split that llama.cpp would refuse or take without acting on it.
    offloaded: some layers go to a device; offload_hint: how to offload them, for the message."""
    given = split.given(spelling)
    if not given:
        return
    if split.mode == "row":
        instead = "the RPC servers take whole layers" if rpc else "each GPU takes whole layers and their KV cache"
        raise SplitError(f"{spelling.split_mode} row: {ROW_UNSUPPORTED}; use {spelling.split_mode} layer ({instead})")
    if not offloaded:
        hint = offload_hint or f"give {spelling.gpu_layers} N (e.g. 99: every layer)"
        raise SplitError(f"{', '.join(given)}: no layer goes to a GPU, so there is nothing to split: {hint}")
    if split.main_gpu is not None and split.mode != "none":
        raise SplitError(f"{spelling.main_gpu} picks the one GPU of {spelling.split_mode} none; with a layer split "
                         f"(llama.cpp's default) every GPU takes layers and llama.cpp ignores it: add "
                         f"{spelling.split_mode} none, or leave {spelling.main_gpu} out")
    if split.tensor_split is not None and split.mode == "none":
        raise SplitError(f"{spelling.tensor_split} shares layers among GPUs, and {spelling.split_mode} none puts them "
                         f"all on one ({spelling.main_gpu}, default 0): leave out one of the two")


def llama_args(split: GpuSplit, bench: bool = False) -> list[str]:
    """The llama.cpp options for the given ones. bench: llama-bench's spelling, where ',' separates
    values to test one after another and '/' the proportions of one split."""
    args: list[str] = []
    if split.mode is not None:
        args += ["-sm", split.mode]
    if split.tensor_split is not None:
        args += ["-ts", ("/" if bench else ",").join(map(_number_text, split.tensor_split))]
    if split.main_gpu is not None:
        args += ["-mg", str(split.main_gpu)]
    return args


def command_parts(split: GpuSplit) -> list[str]:
    """The tq options for the given ones, for a recorded command."""
    parts: list[str] = []
    if split.mode is not None:
        parts += ["--split-mode", split.mode]
    if split.tensor_split is not None:
        parts += ["--tensor-split", ",".join(map(_number_text, split.tensor_split))]
    if split.main_gpu is not None:
        parts += ["--main-gpu", str(split.main_gpu)]
    return parts


def llama_kwargs(split: GpuSplit, llama_cpp) -> dict:
    """llama_cpp.Llama's keyword arguments for the given ones."""
    kw: dict = {}
    if split.mode is not None:
        kw["split_mode"] = getattr(llama_cpp, f"LLAMA_SPLIT_MODE_{split.mode.upper()}")
    if split.tensor_split is not None:
        kw["tensor_split"] = list(split.tensor_split)
    if split.main_gpu is not None:
        kw["main_gpu"] = split.main_gpu
    return kw
