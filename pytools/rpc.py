"""llama.cpp's RPC backend: a model's layers, and their KV caches (TQ included), on other machines.

    tq rpc-server --port 50052                      # on each machine that lends its CPU (or GPU)
    tq run --rpc 10.0.0.2:50052 -ngl 20 ...         # here: the last 20 layers run there

`tq rpc-server` runs the ggml-rpc-server of this `tq build`. Tensors cross the connection with
their ggml type id as it is, so the server must come from the same patched tree: patches/0013
makes the server name its type count in the handshake and the client refuse a server with
another one. `--rpc` of tq run/chat/serve and load_llama(rpc_servers=) first knock at each server
with that same handshake (probe_server): llama.cpp aborts the whole process when a server cannot
be reached or has other types, and waits without end on a server that is busy with another client
(an rpc-server serves one client at a time), so these are told here, as errors, with a time limit.

The layers that go to the servers are the last --gpu-layers ones (llama.cpp puts RPC devices
first among its offload devices; several servers share them by --tensor-split, else by their free
memory). A server that goes away mid-run is still llama.cpp's abort ("Remote RPC server crashed
or returned malformed response"): the ggml backend interface has no way to return the error.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .arguments import int_arg, port_number, thread_count
from .errors import UserError

# The handshake of ggml-rpc (ggml/src/ggml-rpc/ggml-rpc.cpp of the pinned llama.cpp): command
# byte 14 (RPC_CMD_HELLO), the request size as a little-endian uint64, then RPC_CONN_CAPS_SIZE
# bytes of transport capabilities (zeros: plain TCP); the answer is its size (uint64), then major,
# minor, patch and the byte where patches/0013 puts the server's GGML_TYPE_COUNT, then the caps.
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
# GGML_TYPE_COUNT of the patched tree (the last patch that sets it, patches/0017; tests/test_rpc.py
# reads it there). Written out rather than taken from ggml_lib, which needs numpy: tq run/serve do not.
GGML_TYPE_COUNT = 54

DEFAULT_PORT = 50052      # ggml-rpc-server's default
PROBE_TIMEOUT = 10.0      # seconds for a server to answer the handshake


def parse_servers(value: str | Sequence[str]) -> list[str]:
    """'host:port,host:port' (or a list of 'host:port') as ggml-rpc reads it: the host is what
    comes before the first ':', so IPv6 addresses cannot be given (ggml-rpc connects over IPv4)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    servers = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"an RPC server is a 'host:port' string, not {item!r}")
        item = item.strip()
        host, sep, port = item.partition(":")
        if not sep or not host:
            raise ValueError(f"RPC server {item!r} is not host:port (e.g. 192.168.1.7:{DEFAULT_PORT})")
        if ":" in port:
            raise ValueError(f"RPC server {item!r}: ggml-rpc takes IPv4 addresses or host names, not IPv6")
        try:
            port_number(port)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"RPC server {item!r}: {exc}") from None
        servers.append(f"{host}:{int(port)}")
    if not servers:
        raise ValueError("no RPC server given")
    if len(set(servers)) != len(servers):
        raise ValueError(f"an RPC server is given twice: {','.join(servers)}")
    return servers


def servers_arg(text: str) -> list[str]:
    """argparse type of --rpc."""
    try:
        return parse_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_rpc_argument(p: argparse.ArgumentParser) -> None:
    """--rpc of tq run, chat and serve."""
    p.add_argument("--rpc", type=servers_arg, default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="`tq rpc-server`s that run the last --gpu-layers layers and hold their KV cache")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection was closed")
        data += chunk
    return data


def probe_server(endpoint: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, int, int]:
    """Do ggml-rpc's handshake with one server and close; its protocol version, or UserError
    saying why llama.cpp could not use it (unreachable, busy, another protocol or type table)."""
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(s, 8))
            if size != 4 + RPC_CONN_CAPS_SIZE:
                raise UserError(f"{endpoint} answered the RPC handshake with {size} bytes instead of "
                                f"{4 + RPC_CONN_CAPS_SIZE}: not a ggml-rpc-server of this llama.cpp")
            major, minor, patch, n_types = _recv_exact(s, 4)
    except socket.timeout:
        raise UserError(f"the rpc-server at {endpoint} did not answer in {timeout:.0f} s (an rpc-server serves one "
                        "client at a time: is another client connected to it?)") from None
    except (OSError, ConnectionError) as exc:
        raise UserError(f"cannot reach an rpc-server at {endpoint} ({exc}): start one there with "
                        f"`tq rpc-server --host ADDRESS --port {port}`") from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise UserError(f"the rpc-server at {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this build "
                        f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the ggml-rpc-server of the same `tq build` there")
    if n_types != GGML_TYPE_COUNT:
        what = "a stock llama.cpp rpc-server, without the TQ types" if n_types == 0 else f"{n_types} ggml types"
        raise UserError(f"the rpc-server at {endpoint} is {what}; this build has {GGML_TYPE_COUNT}: run "
                        "`tq rpc-server` (the ggml-rpc-server of the same `tq build`) there")
    return major, minor, patch


def check_servers(servers: Sequence[str], timeout: float = PROBE_TIMEOUT) -> None:
    for endpoint in servers:
        probe_server(endpoint, timeout)


def check_offload(servers: Sequence[str] | None, gpu_layers: int) -> None:
    """--rpc without layers to put there would leave the servers idle without a word."""
    if servers and gpu_layers == 0:
        raise UserError("--rpc puts the last --gpu-layers (-ngl) layers on the RPC servers: give -ngl N "
                        "(-1 or more than the model's layers: all of them)")


# --------------------------------------------------------------------------- llama-cpp-python

_registered: list[str] = []   # endpoints added to ggml's backend registry by this process, in order


def register_servers(llama_cpp, servers: Sequence[str] | None, n_gpu_layers: int) -> None:
    """Add RPC servers to ggml's registry before a llama_cpp.Llama is made (what llama.cpp's
    --rpc does: llama-cpp-python 0.3.36 has no argument for it), after probe_server on each.

    ggml cannot take a backend out of its registry again, and llama.cpp offloads to every
    registered RPC device: so within one process every Llama with n_gpu_layers != 0 must name
    the same servers in the same order (ValueError otherwise)."""
    servers = parse_servers(servers) if servers else []
    if servers and n_gpu_layers == 0:
        raise ValueError("rpc_servers take the last n_gpu_layers layers: with n_gpu_layers=0 they would hold nothing")
    if n_gpu_layers != 0 and _registered and servers != _registered:
        raise ValueError(f"this process already added the RPC servers {','.join(_registered)} to ggml, which cannot "
                         "remove them, and llama.cpp offloads to all of them: pass the same rpc_servers (in the same "
                         "order), or use another process")
    if not servers or servers == _registered:
        return
    if not llama_cpp.llama_supports_rpc():
        raise UserError("this llama.cpp is built without the RPC backend: rebuild with `tq build` (GGML_RPC=ON)")
    check_servers(servers)
    lib = ctypes.CDLL(str(Path(os.environ["LLAMA_CPP_LIB_PATH"]) / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    rpc_reg = lib.ggml_backend_reg_by_name(b"RPC")
    add_addr = rpc_reg and lib.ggml_backend_reg_get_proc_address(rpc_reg, b"ggml_backend_rpc_add_server")
    if not add_addr:
        raise UserError("the RPC backend of this build has no ggml_backend_rpc_add_server: rebuild with `tq build`")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add_addr)
    for endpoint in servers:
        reg = add_server(endpoint.encode())
        if not reg:
            raise UserError(f"the rpc-server at {endpoint} has no device to lend")
        lib.ggml_backend_register(reg)
        _registered.append(endpoint)


# --------------------------------------------------------------------------- what crosses the network

class CountingProxy:
    """A TCP relay from 127.0.0.1:<free port> to one rpc-server that counts the bytes each way:
    what `tq rpc-bytes` measures (ggml-rpc keeps no count of its own)."""

    def __init__(self, target: str):
        host, _, port = target.partition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0        # client -> server
        self.received = 0    # server -> client
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = 0

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:   # closed
                return
            try:
                server = socket.create_connection(self.target, timeout=PROBE_TIMEOUT)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):   # as ggml-rpc's own sockets: small messages go at once
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "received"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:   # one side gone: end the other, as the direct connection would
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class RpcServerProcess:
    """A ggml-rpc-server of this build on 127.0.0.1:<free port>, ready (it answered the
    handshake) when the constructor returns; stop() ends it. For tests and `tq rpc-bytes`."""

    def __init__(self, threads: int = 1, log: Path | None = None, cuda: bool = False, ready_timeout: float = 60.0):
        from .build import find_binary

        with socket.socket() as s:   # a free port; the server binds it right after
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        cmd = [str(find_binary("ggml-rpc-server", cuda=cuda)), "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", str(threads)]
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            if log:
                out.close()
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"ggml-rpc-server exited with {self.proc.returncode} at start" +
                                (f":\n{log.read_text(errors='replace')[-2000:]}" if log else ""))
            try:
                probe_server(self.endpoint, timeout=5)
                return
            except UserError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"ggml-rpc-server did not answer on {self.endpoint} in {ready_timeout:.0f} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def measure_bytes(model: str, pairs: list[tuple[str, str]], gpu_layers: int, n_short: int, n_long: int,
                  depths: list[int], threads: int) -> list[dict]:
    """Bytes through the connection to one rpc-server holding the last gpu_layers layers, for
    greedy runs of n_short and n_long decoded tokens after a prompt of about depth tokens: the
    difference over n_long - n_short is what one decoded token sends and receives."""
    from .generate import run_completion

    rows = []
    with RpcServerProcess(threads=threads) as server:
        proxy = CountingProxy(server.endpoint)
        try:
            for depth in depths:
                prompt = "Once upon a time," + " the" * depth   # " the" is one token in SmolLM2's vocabulary
                for ctk, ctv in pairs:
                    counts = {}
                    for n in (n_short, n_long):
                        proxy.reset()
                        run_completion(model, prompt, ctk, ctv, n, depth + n_long + 64, threads, 1, ["--ignore-eos"],
                                       gpu_layers=gpu_layers, rpc=[proxy.endpoint])
                        counts[n] = (proxy.sent, proxy.received)
                    dn = n_long - n_short
                    rows.append({"k": ctk, "v": ctv, "depth": depth, "gpu_layers": gpu_layers,
                                 "sent_per_token": (counts[n_long][0] - counts[n_short][0]) / dn,
                                 "received_per_token": (counts[n_long][1] - counts[n_short][1]) / dn,
                                 "sent_run_short": counts[n_short][0], "received_run_short": counts[n_short][1]})
        finally:
            proxy.close()
    return rows


def bytes_markdown(rows: list[dict], command: str, model: str, n_short: int, n_long: int) -> str:
    lines = [f"# Bytes through the RPC connection per decoded token, {model}", "",
             f"Made by `{command}` on {time.strftime('%Y-%m-%dT%H:%M:%S%z')}.", "",
             f"One ggml-rpc-server on loopback holds the last {rows[0]['gpu_layers']} layers of -ngl (the output "
             f"layer and the last {rows[0]['gpu_layers'] - 1} repeating layers) and their KV cache; the embeddings and "
             "the other layers run in llama-completion. Bytes are counted by a TCP relay between them "
             f"(pytools/rpc.py CountingProxy); per token = (run of {n_long} greedy tokens - run of {n_short}) / "
             f"{n_long - n_short}, so loading, the prompt and the handshake cancel out. Depth: prompt tokens before "
             "the decoded ones (about). llama.cpp's -ngl counts the output layer as the last layer, so the server "
             "computes the logits and sends them back (vocabulary x 4 bytes per token); the KV cache never crosses.",
             "",
             "| K/V | depth | client -> server B/token | server -> client B/token | total B/token | "
             f"whole run of {n_short} tokens, client -> server |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']}/{r['v']} | {r['depth']} | {r['sent_per_token']:.0f} | {r['received_per_token']:.0f} | "
                     f"{r['sent_per_token'] + r['received_per_token']:.0f} | {r['sent_run_short'] / 1e6:.1f} MB |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tq rpc-server

def server_command(args: argparse.Namespace) -> list[str]:
    from .build import find_binary

    cmd = [str(find_binary("ggml-rpc-server", cuda=args.cuda)), "--host", args.host, "--port", str(args.port)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    if args.cache:
        cmd.append("--cache")
    return cmd


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rpc-server", help="lend this machine's CPU (or GPU) to `tq run/chat/serve --rpc` elsewhere "
                                          "(llama.cpp's ggml-rpc-server with the TQ types)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--threads", "-t", type=thread_count, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--cuda", action="store_true", help="the CUDA build's server (`tq build --cuda`), lending CUDA0")
    p.add_argument("--device", "-d", default=None, help="comma-separated ggml devices to lend (e.g. CUDA0,CPU)")
    p.add_argument("--cache", "-c", action="store_true",
                   help="keep received weights in llama.cpp's cache folder (a second load skips sending them)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: an rpc-server has no authentication and lets whoever connects "
                        "allocate memory and run graphs on this machine; use it on a trusted network only")
    p.set_defaults(func=_cmd_rpc_server)

    p = sub.add_parser("rpc-bytes", help="bytes per decoded token through the connection to an rpc-server "
                                         "(one on loopback), per cache type (results/rpc-bytes.md)")
    p.add_argument("--model", "-m", default="smollm2")
    p.add_argument("--types", default="f16/f16,tq3/tq2,tq2/tq2", help="comma-separated K/V pairs")
    p.add_argument("--gpu-layers", "-ngl", type=int_arg(1, what="a layer count"), default=20,
                   help="layers on the rpc-server (default 20)")
    p.add_argument("--n-short", type=int_arg(1, what="a token count"), default=8)
    p.add_argument("--n-long", type=int_arg(2, what="a token count"), default=40)
    p.add_argument("--depths", default="0,1000", help="comma-separated prompt lengths in tokens (about)")
    p.add_argument("--threads", "-t", type=thread_count, default=1)
    p.add_argument("--output", "-o", type=Path, default=None, help="Markdown file (default: print)")
    p.set_defaults(func=_cmd_rpc_bytes)


def _cmd_rpc_server(args: argparse.Namespace) -> int:
    from .serve import is_loopback

    if not is_loopback(args.host) and not args.allow_remote:
        raise UserError(f"--host {args.host} is not a loopback address: an rpc-server has no authentication and "
                        "anyone who reaches it can use this machine's memory and processors. Pass --allow-remote on "
                        "a trusted network")
    cmd = server_command(args)
    print("tq: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)   # the server itself: its signals and exit code are the command's
    return 0   # not reached


def _cmd_rpc_bytes(args: argparse.Namespace) -> int:
    from .generate import check_cache_type

    pairs = []
    for item in args.types.split(","):
        k, sep, v = item.strip().partition("/")
        if not sep:
            raise UserError(f"--types: {item!r} is not K/V (e.g. tq3/tq2)")
        pairs.append((check_cache_type(k), check_cache_type(v)))
    if args.n_long <= args.n_short:
        raise UserError(f"--n-long {args.n_long} must be more than --n-short {args.n_short}")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise UserError(f"--depths {args.depths!r} is not a comma-separated list of token counts") from None
    if any(d < 0 for d in depths):
        raise UserError("--depths: a prompt length is at least 0")
    rows = measure_bytes(args.model, pairs, args.gpu_layers, args.n_short, args.n_long, depths, args.threads)
    command = "tq " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["rpc-bytes"] else "tq rpc-bytes"
    text = bytes_markdown(rows, command, args.model, args.n_short, args.n_long)
    if args.output:
        args.output.write_text(text)
        print(args.output)
    else:
        print(text, end="")
    return 0
