"""`tq serve`: the patched llama-server (OpenAI-compatible API) with a TQ KV cache.

Flash attention is on (a quantized V cache needs it), the cache types and --parallel are
passed, the URL is printed, SIGINT/SIGTERM/SIGHUP are forwarded to the server and `tq serve`
exits with the server's exit code. Only loopback addresses (and UNIX sockets) are served unless
--allow-remote.

What it listens on is set by `tq serve --host/--port` alone. llama-server takes its listening
address from --host (IP addresses or host names, comma-separated, or UNIX socket paths ending in
.sock) and --port, from LLAMA_ARG_HOST/LLAMA_ARG_PORT (the command line wins over them) and, with
AIP_MODE=PREDICTION, from AIP_HTTP_PORT (which wins over --port). So --host and --port after `--`
are refused unless --allow-remote (they then replace tq serve's, and the printed address is
theirs), and AIP_MODE=PREDICTION is refused. Options tq serve sets itself (model, cache types,
context, slots, flash attention, GPU layers and their split, RPC servers) are refused after `--`:
the printed line would not describe the server that runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys

from . import switches
from .build import find_binary
from .errors import UserError
from .arguments import context_size, int_arg, port_number
from .generate import check_cache_type
from .gpu_split import add_split_arguments, check_split, split_from_args
from .gpu_split import llama_args as split_args
from .kv_shape import model_kv_shape
from .mem import allocation_summary, server_slots
from .models import model_path
from .rpc import check_offload, check_servers, add_rpc_argument


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:   # a host name: loopback only if every address it resolves to is
            infos = socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def is_unix_socket(host: str) -> bool:
    return host.endswith(".sock")   # llama-server's rule for a --host entry


def split_hosts(value: str) -> list[str]:
    """llama-server's --host: comma-separated addresses, blanks dropped."""
    return [h.strip() for h in value.split(",") if h.strip()]


def is_local(host_value: str) -> bool:
    """Every address of a --host value is a loopback address or a UNIX socket."""
    hosts = split_hosts(host_value)
    return bool(hosts) and all(is_unix_socket(h) or is_loopback(h) for h in hosts)


# llama-server options that tq serve sets itself (common/arg.cpp spellings; llama.cpp reads "_"
# as "-" in long options, and the last copy of an option wins): a copy after -- would override
# tq serve's while the printed line says otherwise. An argument is taken for an option wherever it
# stands, even as another option's value: that can only refuse too much, never let one through.
BIND_OPTIONS = ("--host", "--port")
OWN_OPTIONS = {   # spelling -> tq serve's own option
    "-m": "--model", "--model": "--model", "-c": "--ctx", "--ctx-size": "--ctx",
    "-np": "--parallel", "--parallel": "--parallel",
    "-ctk": "--ctk", "--cache-type-k": "--ctk", "-ctv": "--ctv", "--cache-type-v": "--ctv",
    "-fa": "(always on)", "--flash-attn": "(always on)",
    "-ngl": "--gpu-layers", "--gpu-layers": "--gpu-layers", "--n-gpu-layers": "--gpu-layers",
    "--rpc": "--rpc",
    "-sm": "--split-mode", "--split-mode": "--split-mode", "-ts": "--tensor-split", "--tensor-split": "--tensor-split",
    "-mg": "--main-gpu", "--main-gpu": "--main-gpu",
}


def _option_name(arg: str) -> str:
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def take_bind_options(extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """extra without its --host/--port (and their values), and the last value of each."""
    rest: list[str] = []
    found: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        name = _option_name(arg)
        if name in BIND_OPTIONS:
            if "=" in arg:
                found[name] = arg.split("=", 1)[1]
            elif i + 1 < len(extra):
                found[name] = extra[i + 1]
                i += 1
            else:
                raise UserError(f"{arg} after -- has no value")
        else:
            rest.append(arg)
        i += 1
    return rest, found


def check_extra(extra: list[str], allow_remote: bool) -> tuple[list[str], dict[str, str]]:
    """The pass-through arguments without bind options, and the bind options they gave (only
    with allow_remote); UserError for an option tq serve sets itself."""
    for arg in extra:
        name = _option_name(arg)
        if name in OWN_OPTIONS:
            own = OWN_OPTIONS[name]
            instead = "flash attention is always on" if own.startswith("(") else f"use tq serve's {own}"
            raise UserError(f"{arg} after -- would override what tq serve sets itself: {instead}")
    rest, bind = take_bind_options(extra)
    if bind and not allow_remote:
        given = " ".join(f"{k} {v}" for k, v in bind.items())
        raise UserError(f"{given} after -- would change the address llama-server listens on: use tq serve's own "
                        "--host/--port (a non-loopback --host also needs --allow-remote), or pass --allow-remote")
    return rest, bind


def endpoint_text(host_value: str, port: int, prefix: str = "") -> str:
    """Where the server answers, one entry per --host address."""
    places = []
    for h in split_hosts(host_value):
        if is_unix_socket(h):
            places.append(f"unix socket {h} (OpenAI API under {prefix}/v1)")
        else:
            host = f"[{h.strip('[]')}]" if ":" in h else h
            places.append(f"http://{host}:{port}{prefix} (OpenAI API: http://{host}:{port}{prefix}/v1)")
    return ", ".join(places)


def _api_prefix(extra: list[str]) -> str:
    prefix = os.environ.get("LLAMA_ARG_API_PREFIX", "")
    for i, arg in enumerate(extra):
        if _option_name(arg) == "--api-prefix":
            prefix = arg.split("=", 1)[1] if "=" in arg else (extra[i + 1] if i + 1 < len(extra) else prefix)
    return prefix


def server_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    exe = find_binary("llama-server", cuda=args.cuda)
    cmd = [str(exe), "-m", str(model_path(args.model)), "-fa", "on",
           "-ctk", check_cache_type(args.ctk), "-ctv", check_cache_type(args.ctv),
           "-c", str(args.ctx), "--parallel", str(args.parallel), "--host", args.host, "--port", str(args.port)]
    cmd += switches.llama_args(switches.apply_args(args), model_path(args.model), args.ctk, args.ctx)
    if args.gpu_layers is not None:
        cmd += ["-ngl", str(args.gpu_layers)]
    if args.rpc:
        cmd += ["--rpc", ",".join(args.rpc)]
    cmd += split_args(split_from_args(args))
    return cmd + extra


def _offload_hint(args: argparse.Namespace) -> str:
    """What a split needs that the command line lacks: layers to offload, and a build with GPUs."""
    missing = []
    if not args.gpu_layers:
        missing.append("--gpu-layers N (e.g. 99: every layer)")
    if not args.cuda and not args.rpc:
        missing.append("--cuda (the CPU build's llama-server has no GPU)")
    return "give " + " and ".join(missing)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="llama-server (OpenAI-compatible HTTP API) with a TQ KV cache")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--ctx", "-c", type=context_size, default=8192,
                   help="total context (default 8192); each of the --parallel slots gets ctx/parallel tokens")
    p.add_argument("--parallel", "-np", type=int_arg(1, what="a slot count"), default=4,
                   help="concurrent request slots (default 4)")
    p.add_argument("--port", type=port_number, default=8080)
    p.add_argument("--host", default="127.0.0.1",
                   help="address(es) to listen on, comma-separated, or a UNIX socket path ending in .sock (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host, and --host/--port after -- (llama-server has no authentication "
                        "unless you pass -- --api-key KEY)")
    p.add_argument("--gpu-layers", "-ngl", type=int_arg(0, what="a layer count"), default=None,
                   help="layers to offload to the GPU (CUDA build)")
    p.add_argument("--cuda", action="store_true", help="run the CUDA build's llama-server")
    add_rpc_argument(p)
    add_split_arguments(p, needs="--gpu-layers and --cuda")
    switches.add_option_arguments(p)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-server arguments")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    extra, bind = check_extra(extra, args.allow_remote)
    args.host = bind.get("--host", args.host)
    if "--port" in bind:
        try:
            args.port = port_number(bind["--port"])
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"--port after --: {exc}") from None
    if not is_local(args.host) and not args.allow_remote:
        raise UserError(f"--host {args.host} is not a loopback address: the server would answer anyone who can reach "
                        "this machine, and llama-server has no authentication unless it is given --api-key. "
                        "Pass --allow-remote to do it anyway (and consider `-- --api-key KEY`)")
    if os.environ.get("AIP_MODE") == "PREDICTION":
        raise UserError("AIP_MODE=PREDICTION is set: llama-server would listen on AIP_HTTP_PORT "
                        f"({os.environ.get('AIP_HTTP_PORT') or 8080}) instead of --port {args.port}; unset AIP_MODE")
    if args.ctx < args.parallel:
        raise UserError(f"--ctx {args.ctx} is less than --parallel {args.parallel}: each slot needs at least one token")
    shape = model_kv_shape(args.model)
    shape.check_types(args.ctk, args.ctv)
    if args.rpc:
        check_offload(args.rpc, args.gpu_layers or 0)
    check_split(split_from_args(args), bool(args.gpu_layers) and (args.cuda or bool(args.rpc)), bool(args.rpc),
                offload_hint=_offload_hint(args))
    if args.rpc:
        check_servers(args.rpc)
    slots = server_slots(args.ctx, args.parallel, extra)
    cmd = server_command(args, extra)
    print(f"tq: {shlex.join(cmd)}", file=sys.stderr)
    # its own process group: a terminal's Ctrl-C reaches only us, and we forward it once
    # (llama-server ends at once on a second SIGINT, without finishing its requests)
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    print(f"tq: serving {args.model} at {endpoint_text(args.host, args.port, _api_prefix(extra))}, "
          + (f"{args.parallel} slots sharing {slots.n_ctx_padded} tokens; " if slots.unified else
             f"{args.parallel} slots of {slots.n_ctx_seq} tokens; ") +
          "Ctrl-C stops it", flush=True)
    print(f"tq: {allocation_summary(shape, args.ctk, args.ctv, slots)}", flush=True)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:   # only if a signal arrives before our handler is installed
                forward(signal.SIGINT, None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code < 0:   # ended by a signal: report it the way a shell does
        return 128 - code
    return code
