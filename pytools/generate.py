"""`tq run`: generate text with the patched llama.cpp (llama-completion) and a TQ cache, and say
how much KV memory the cache types save against f16."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from .build import find_binary
from . import switches
from .cache_types import cache_type
from .errors import UserError
from .arguments import context_size, int_arg, seed_value, thread_count
from .kv_memory import Slots, kv_size
from .kv_shape import KvShape, model_kv_shape
from .models import model_path
from .gpu_split import GpuSplit, add_split_arguments, check_split, split_from_args
from .gpu_split import llama_args as split_args
from .rpc import check_offload, check_servers, add_rpc_argument

_KV_LINE = re.compile(r"llama_kv_cache: size = +[\d.]+ MiB \( *(\d+) cells, +\d+ layers, +(\d+)/(\d+) seqs\), "
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_CONTEXT_LINE = "llama_context: n_ctx "   # each context creation logs it before its caches


def check_cache_type(name: str) -> str:
    return cache_type(name).name


@dataclass
class KvMemory:
    k_type: str
    v_type: str
    k_mib: float
    v_mib: float
    cells: int
    f16_mib: float | None = None   # the same cells with an f16 cache (needs the model's KV shape)

    @property
    def total_mib(self) -> float:
        return self.k_mib + self.v_mib

    def summary(self) -> str:
        text = f"KV cache {self.k_type}/{self.v_type}: {self.total_mib:.2f} MiB (K {self.k_mib:.2f} + V {self.v_mib:.2f})"
        if self.f16_mib is None:
            return text
        return (text + f"; an f16 cache would take {self.f16_mib:.2f} MiB: "
                f"{self.f16_mib / self.total_mib:.2f}x smaller, {self.f16_mib - self.total_mib:.2f} MiB saved")


@dataclass(frozen=True)
class LoggedCache:
    """One `llama_kv_cache: size = ...` line: cells per stream, sequences, streams, K and V."""
    cells: int
    n_seq: int
    n_stream: int
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float


def logged_caches(log: str) -> list[LoggedCache]:
    """The KV caches of the last context llama.cpp created (verbose log): it may create one more
    than once while fitting memory, and a sliding-window model has two caches, the full-attention
    one first. Without the context line only the last cache line counts."""
    found = [LoggedCache(int(m[1]), int(m[2]), int(m[3]), m[4], float(m[5]), m[6], float(m[7]))
             for m in _KV_LINE.finditer(log.rsplit(_CONTEXT_LINE, 1)[-1])]
    return found if _CONTEXT_LINE in log else found[-1:]


def parse_kv_memory(log: str, shape: KvShape | None = None) -> KvMemory | None:
    """The KV cache of the context llama.cpp created, all its caches together. With the model's
    KV shape, also what an f16 cache of the same layout takes (the ratio is not one of bits per
    value alone: a TQ cache keeps protected layers at q8_0)."""
    caches = logged_caches(log)
    if not caches:
        return None
    full = caches[0]
    f16 = None
    if shape is not None:
        slots = Slots(full.cells * full.n_stream, full.n_seq, unified=full.n_stream == 1 and full.n_seq > 1)
        f16 = kv_size(shape, "f16", "f16", slots).total / 2**20
    return KvMemory(full.k_type, full.v_type, round(sum(c.k_mib for c in caches), 2),
                    round(sum(c.v_mib for c in caches), 2), full.cells, f16)


# what an error message may quote of a child's log: llama.cpp's verbose log repeats the whole
# prompt and its tokens, tens of kilobytes for a long prompt, on one line
ERROR_LINES = 15
ERROR_LINE_CHARS = 300
_PROMPT_TOO_LONG = re.compile(r"prompt is too long \((\d+) tokens, max (\d+)\)")
# ggml-rpc's abort when a server closes the connection or answers what it should not (RPC_STATUS_ASSERT)
_RPC_LOST = "Remote RPC server crashed or returned malformed response"
_RPC_NO_CONNECT = re.compile(r"Failed to connect to (\S+)")


def decode_output(data: bytes) -> str:
    """A child's output as text: llama.cpp prints token pieces as they come, so a multi-byte
    character can be cut between two tokens (or by -n); such bytes become U+FFFD."""
    return data.decode("utf-8", errors="replace")


def log_tail(log: str, lines: int = ERROR_LINES, width: int = ERROR_LINE_CHARS) -> str:
    """The last lines of a log, each cut to width characters, for an error message."""
    tail = log.strip().splitlines()[-lines:]
    return "\n".join(line if len(line) <= width else f"{line[:width]}... [{len(line) - width} more characters]"
                     for line in tail)


def completion_error(returncode: int, log: str) -> UserError:
    m = _PROMPT_TOO_LONG.search(log)
    if m:
        return UserError(f"the prompt is {m.group(1)} tokens and the context holds {m.group(2)} "
                         "(llama-completion keeps 4 cells free): raise --ctx or shorten the prompt")
    m = _RPC_NO_CONNECT.search(log)
    if m:
        return UserError(f"llama-completion could not connect to the rpc-server at {m.group(1)} (it answered tq's "
                         "handshake just before: has it stopped?)")
    if _RPC_LOST in log:
        return UserError("an rpc-server stopped answering: llama-completion lost its connection and aborted "
                         f"(exit {returncode}); see the server's log, then start it again:\n{log_tail(log)}")
    return UserError(f"llama-completion failed (exit {returncode}):\n{log_tail(log)}")


def run_completion(model: str, prompt: str, ctk: str, ctv: str, n_predict: int, ctx: int, threads: int | None,
                   seed: int, extra: list[str], echo: BinaryIO | None = None,
                   setting: Mapping[str, switches.Value] | None = None, gpu_layers: int = 0,
                   rpc: list[str] | None = None, split: GpuSplit = GpuSplit()) -> tuple[str, KvMemory | None]:
    """Generate with llama-completion; returns its output (the prompt, then the generated text)
    and the KV memory it reported. echo: a binary stream that gets the output as it comes, byte
    for byte (a multi-byte character cut by -n stays cut there). gpu_layers != 0: the CUDA build,
    with that many layers and their caches on the GPU; with rpc (`tq rpc-server` endpoints) they go
    to those servers instead and the CPU build runs here. split: how several GPUs (or RPC servers)
    share those layers (gpu_split.py)."""
    check_offload(rpc, gpu_layers)
    check_split(split, gpu_layers != 0, bool(rpc))
    if rpc:
        check_servers(rpc)
    exe = find_binary("llama-completion", cuda=gpu_layers != 0 and not rpc)
    path = model_path(model)
    with tempfile.TemporaryDirectory(prefix="tq-run-") as tmp:
        # the prompt goes through a file: a command line holds at most 128 KiB per argument, and
        # -f drops one trailing newline, so one is added (argv's undecodable bytes are kept)
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_bytes(prompt.encode("utf-8", errors="surrogateescape") + b"\n")
        cmd = [str(exe), "-m", str(path), "-f", str(prompt_file), "-n", str(n_predict), "-c", str(ctx),
               "-fa", "on", "-ctk", check_cache_type(ctk), "-ctv", check_cache_type(ctv), "--temp", "0",
               "--seed", str(seed), "-no-cnv", "--no-warmup", "-v"]
        if threads:
            cmd += ["-t", str(threads)]
        if gpu_layers != 0:
            cmd += ["-ngl", str(gpu_layers)]
        if rpc:
            cmd += ["--rpc", ",".join(rpc)]
        cmd += split_args(split)
        cmd += switches.llama_args(switches.from_env() if setting is None else setting, path, ctk, ctx) + extra
        with open(Path(tmp) / "stderr.log", "w+b") as err:
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL) as proc:
                assert proc.stdout is not None
                parts: list[bytes] = []
                while data := proc.stdout.read1(65536):
                    parts.append(data)
                    if echo is not None:
                        echo.write(data)
                        echo.flush()
                returncode = proc.wait()
            err.seek(0)
            log = decode_output(err.read())
    if returncode != 0:
        raise completion_error(returncode, log)
    return decode_output(b"".join(parts)), parse_kv_memory(log, model_kv_shape(path))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text with a TQ KV cache (llama-completion) and report the KV memory saved")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--prompt", "-p", default="The capital of Germany is")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--n-predict", "-n", type=int_arg(1, also=(-1,), what="a token count"), default=48,
                   help="tokens to generate (default 48; -1: until the end of text or of the context)")
    p.add_argument("--ctx", "-c", type=context_size, default=4096)
    p.add_argument("--threads", "-t", type=thread_count, default=None)
    p.add_argument("--seed", type=seed_value, default=1)
    p.add_argument("--gpu-layers", "-ngl", type=int_arg(0, also=(-1,), what="a layer count"), default=0,
                   help="layers (and their KV cache) on the GPU, with the CUDA build (`tq build --cuda`); -1: all. "
                        "With --rpc: the last N layers on the RPC servers")
    add_rpc_argument(p)
    add_split_arguments(p)
    switches.add_option_arguments(p)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-completion arguments")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    # the text streams as llama-completion prints it, its bytes unchanged (the terminal decodes them)
    out = getattr(sys.stdout, "buffer", None)
    sys.stdout.flush()
    try:
        text, mem = run_completion(args.model, args.prompt, args.ctk, args.ctv, args.n_predict, args.ctx,
                                   args.threads, args.seed, extra, echo=out, setting=switches.apply_args(args),
                                   gpu_layers=args.gpu_layers, rpc=args.rpc,
                                   split=split_from_args(args))
        if out is None:   # a stdout without bytes (a StringIO): the text, cut characters replaced
            sys.stdout.write(text)
        if not text.endswith("\n"):
            sys.stdout.write("\n")   # after the streamed bytes: run_completion flushed them
        sys.stdout.flush()
    except BrokenPipeError:   # `tq run | head -1`: the reader has gone, and llama-completion with it
        sys.stdout = open(os.devnull, "w")   # the interpreter's final flush must not fail again
        return 141
    print(mem.summary() if mem else "KV cache size: not reported by llama.cpp", file=sys.stderr)
    return 0
