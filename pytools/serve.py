"""`tq serve`: the patched llama-server (OpenAI-compatible API) with a TQ KV cache.

Flash attention is on (a quantized V cache needs it), the cache types and --parallel are
passed, the URL is printed, SIGINT/SIGTERM/SIGHUP are forwarded to the server and `tq serve`
exits with the server's exit code. Only loopback addresses are served unless --allow-remote.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import subprocess
import sys

from .build import find_binary
from .errors import UserError
from .generate import check_cache_type
from .cache_types import is_tq
from .mem import check_pair, model_kv_shape
from .models import model_path


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:   # a host name: loopback only if every address it resolves to is
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def server_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    exe = find_binary("llama-server", cuda=args.cuda)
    cmd = [str(exe), "-m", str(model_path(args.model)), "-fa", "on",
           "-ctk", check_cache_type(args.ctk), "-ctv", check_cache_type(args.ctv),
           "-c", str(args.ctx), "--parallel", str(args.parallel), "--host", args.host, "--port", str(args.port)]
    if args.gpu_layers is not None:
        cmd += ["-ngl", str(args.gpu_layers)]
        if args.gpu_layers != 0 and (is_tq(args.ctk) or is_tq(args.ctv)) and not {"-nkvo", "--no-kv-offload"} & set(extra):
            # TQ caches have CPU kernels only: weights go to the GPU, the cache and attention stay
            # on the CPU (llama.cpp refuses a TQ cache on the GPU rather than run it slowly)
            print("tq: TQ caches run on the CPU: adding --no-kv-offload (weights still go to the GPU)", file=sys.stderr)
            cmd.append("--no-kv-offload")
    return cmd + extra


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="llama-server (OpenAI-compatible HTTP API) with a TQ KV cache")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--ctx", "-c", type=int, default=8192,
                   help="total context (default 8192); each of the --parallel slots gets ctx/parallel tokens")
    p.add_argument("--parallel", "-np", type=int, default=4, help="concurrent request slots (default 4)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (llama-server has no authentication unless you pass -- --api-key KEY)")
    p.add_argument("--gpu-layers", "-ngl", type=int, default=None, help="layers to offload to the GPU (CUDA build)")
    p.add_argument("--cuda", action="store_true", help="run the CUDA build's llama-server")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-server arguments")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if not is_loopback(args.host) and not args.allow_remote:
        raise UserError(f"--host {args.host} is not a loopback address: the server would answer anyone who can reach "
                        "this machine, and llama-server has no authentication unless it is given --api-key. "
                        "Pass --allow-remote to do it anyway (and consider `-- --api-key KEY`)")
    if args.parallel < 1 or args.ctx < args.parallel:
        raise UserError("--parallel must be at least 1 and --ctx at least --parallel")
    shape = model_kv_shape(args.model)
    check_pair(shape, args.ctk, args.ctv)
    cmd = server_command(args, extra)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tq: {' '.join(cmd)}", file=sys.stderr)
    # its own process group: a terminal's Ctrl-C reaches only us, and we forward it once
    # (llama-server ends at once on a second SIGINT, without finishing its requests)
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    print(f"tq: serving {args.model} at http://{host}:{args.port} (OpenAI API: http://{host}:{args.port}/v1), "
          f"KV cache {args.ctk}/{args.ctv}, {args.parallel} slots of {args.ctx // args.parallel} tokens; "
          "Ctrl-C stops it", flush=True)
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
