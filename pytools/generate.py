"""`tq run`: generate text with the patched llama.cpp (llama-completion) and a TQ cache, and say
how much KV memory the cache types save against f16."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass

from .build import find_binary
from .cache_types import cache_type
from .errors import UserError
from .mem import KvShape, kv_size, model_kv_shape
from .models import model_path

_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*K \((\w+)\): +([\d.]+) MiB, "
                      r"V \((\w+)\): +([\d.]+) MiB")


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


def parse_kv_memory(log: str, shape: KvShape | None = None) -> KvMemory | None:
    """The KV cache llama.cpp reports when it creates the context (it may create it more than once
    while fitting memory: the last report is the one in use). With the model's KV shape, also what
    an f16 cache of the same cells takes (the ratio is not one of bits per value alone: a TQ cache
    keeps protected layers at q8_0)."""
    found = list(_KV_LINE.finditer(log))
    if not found:
        return None
    m = found[-1]
    cells = int(m.group(2))
    f16 = kv_size(shape, "f16", "f16", cells).total / 2**20 if shape is not None else None
    return KvMemory(m.group(3), m.group(5), float(m.group(4)), float(m.group(6)), cells, f16)


def run_completion(model: str, prompt: str, ctk: str, ctv: str, n_predict: int, ctx: int, threads: int | None,
                   seed: int, extra: list[str]) -> tuple[str, KvMemory | None]:
    exe = find_binary("llama-completion")
    path = model_path(model)
    cmd = [str(exe), "-m", str(path), "-p", prompt, "-n", str(n_predict), "-c", str(ctx),
           "-fa", "on", "-ctk", check_cache_type(ctk), "-ctv", check_cache_type(ctv), "--temp", "0",
           "--seed", str(seed), "-no-cnv", "--no-warmup", "-v"]
    if threads:
        cmd += ["-t", str(threads)]
    cmd += extra
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise UserError(f"llama-completion failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout, parse_kv_memory(proc.stderr, model_kv_shape(path))


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text with a TQ KV cache (llama-completion) and report the KV memory saved")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--prompt", "-p", default="The capital of Germany is")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--n-predict", "-n", type=int, default=48)
    p.add_argument("--ctx", "-c", type=int, default=4096)
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-completion arguments")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    text, mem = run_completion(args.model, args.prompt, args.ctk, args.ctv, args.n_predict, args.ctx, args.threads,
                               args.seed, extra)
    print(text.strip())
    print()
    print(mem.summary() if mem else "KV cache size: not reported by llama.cpp", file=sys.stderr)
    return 0
