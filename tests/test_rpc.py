"""llama.cpp's RPC backend with TQ caches, on loopback: SmolLM2's last layers and their caches in one
or two ggml-rpc-server processes started here (1 thread each), the rest in the client.

The same CPU kernels run on both sides of the connection and tensors cross it byte for byte, so a
split run must give exactly the single-process numbers: the prompt's logits, the greedy tokens and
their logits, and the saved state (which holds the caches the servers kept, exact rows and all)
are compared for equality, not within a tolerance. A server killed mid-run ends the client with
an error, inside a time limit. The handshake checks (a stock or busy server, a bad address) run
against small fake servers and need no build.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from turboquant_llama import REPO_ROOT
from turboquant_llama.errors import UserError
from turboquant_llama import rpc

from .conftest import free_port, require_binary, require_llama_cpp, require_model

N_LAYERS = 30          # SmolLM2-135M
REMOTE_LAYERS = 20     # -ngl 20: layers 11-29 and the output layer on the servers, 0-10 here
N_GEN = 12
PROMPT = "The three primary colours of light are red, green and"

# One child process per case: llama.cpp aborts the process when a server goes away, and ggml
# cannot unregister RPC servers, so the pytest process itself never connects to one.
CHILD = r"""
import json, sys
import numpy as np
from turboquant_llama.llama_python import load_llama, import_llama_cpp, _LogCapture

cfg = json.loads(sys.argv[1])
llama_cpp = import_llama_cpp(cuda=False)

def greedy(llm, n):
    toks, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tok = int(np.argmax(row))
        toks.append(tok)
        logits.append(row)
        llm.eval([tok])
    return toks, np.stack(logits)

def case(tag, **kw):
    with _LogCapture(llama_cpp.llama_cpp) as log:
        llm = load_llama("smollm2", cfg["ctk"], cfg["ctv"], n_ctx=256, n_threads=1, n_batch=256, logits_all=True,
                         cuda=False, **kw)
    prompt = llm.tokenize(cfg["prompt"].encode())
    llm.eval(prompt)
    np.save(f"{cfg['out']}/{tag}-prompt.npy", np.array(llm.scores[:llm.n_tokens], dtype=np.float32))
    state = llm.save_state()
    toks, logits = greedy(llm, cfg["n_gen"])
    np.save(f"{cfg['out']}/{tag}-gen.npy", logits)
    with open(f"{cfg['out']}/{tag}-state.bin", "wb") as f:
        f.write(bytes(state.llama_state))
    llm.load_state(state)                       # back to the end of the prompt
    again, again_logits = greedy(llm, cfg["n_gen"])
    llm.close()
    return {"tokens": toks, "reloaded_tokens": again,
            "reloaded_logits_equal": bool(np.array_equal(again_logits, logits)), "log": log.text}

out = {"local": case("local")}
kw = {"rpc_servers": cfg["servers"], "n_gpu_layers": cfg["ngl"]}
if len(cfg["servers"]) > 1:
    kw["tensor_split"] = [1.0] * len(cfg["servers"])
out["rpc"] = case("rpc", **kw)
print(json.dumps(out))
"""


@pytest.fixture
def servers(tmp_path):
    """start(n): n ggml-rpc-servers of this build on loopback, stopped (killed) at the end whatever
    happens; each logs to tmp_path."""
    require_binary("ggml-rpc-server")
    started: list[rpc.RpcServerProcess] = []

    def start(n: int) -> list[rpc.RpcServerProcess]:
        for _ in range(n):
            started.append(rpc.RpcServerProcess(threads=1, log=tmp_path / f"rpc-server-{len(started)}.log"))
        return started[-n:]

    yield start
    for s in started:
        s.stop()


def _run_child(cfg: dict, timeout: float = 240) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                       errors="replace", timeout=timeout, cwd=str(REPO_ROOT))
    assert r.returncode == 0, f"the client failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ctk,ctv,n_servers", [("tq3", "tq2", 2), ("tq2", "tq2", 1)])
def test_split_over_rpc_servers_equals_one_process(servers, tmp_path, ctk, ctv, n_servers):
    require_model("smollm2")
    require_llama_cpp()
    eps = [s.endpoint for s in servers(n_servers)]
    got = _run_child({"ctk": ctk, "ctv": ctv, "prompt": PROMPT, "n_gen": N_GEN, "out": str(tmp_path),
                      "servers": eps, "ngl": REMOTE_LAYERS})
    # the layers and their TQ caches really are on the servers: llama.cpp's buffer lines name them
    log = got["rpc"]["log"]
    for ep in eps:
        assert re.search(rf"RPC\d+\[{re.escape(ep)}\] model buffer size", log), log[-3000:]
        assert re.search(rf"RPC\d+\[{re.escape(ep)}\] KV buffer size", log), log[-3000:]
    assert "CPU KV buffer size" in log     # and the first layers' caches here
    assert "KV buffer size" not in got["local"]["log"].replace("CPU KV buffer size", "")

    local = {k: np.load(tmp_path / f"local-{k}.npy") for k in ("prompt", "gen")}
    remote = {k: np.load(tmp_path / f"rpc-{k}.npy") for k in ("prompt", "gen")}
    assert local["prompt"].shape[0] >= 8 and np.isfinite(local["prompt"]).all()
    # bit for bit: the same kernels on both sides, tensors copied as they are
    for k in ("prompt", "gen"):
        diff = float(np.max(np.abs(local[k] - remote[k])))
        assert np.array_equal(local[k], remote[k]), f"{k} logits differ by up to {diff}"
    assert got["rpc"]["tokens"] == got["local"]["tokens"]
    # the state read back from the servers is the local one, byte for byte, and loads back
    assert (tmp_path / "rpc-state.bin").read_bytes() == (tmp_path / "local-state.bin").read_bytes()
    for side in ("local", "rpc"):
        assert got[side]["reloaded_tokens"] == got[side]["tokens"]
        assert got[side]["reloaded_logits_equal"]


def test_killed_server_ends_the_client_with_an_error(servers, tmp_path):
    """tq run --rpc: the server is killed while tokens come; the client stops with an error
    naming the lost server within the time limit (no hang)."""
    require_model("smollm2")
    require_binary("llama-completion")
    (server,) = servers(1)
    cmd = [sys.executable, "-m", "turboquant_llama.cli", "run", "--rpc", server.endpoint, "-ngl", str(N_LAYERS + 1),
           "-n", "2000", "-t", "1", "--ctx", "2200", "-p", PROMPT, "--", "--ignore-eos"]
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}   # ggml's abort would attach gdb for a backtrace
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO_ROOT), env=env)
    try:
        # wait for generated text past the echoed prompt, bounded
        seen = b""
        deadline = time.monotonic() + 120
        while len(seen) < len(PROMPT) + 20:
            assert time.monotonic() < deadline, f"no tokens in 120 s: {seen!r}"
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
            seen += proc.stdout.read1(256)
        server.proc.send_signal(signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the client hung after its rpc-server was killed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode(errors="replace")
    assert proc.returncode == 2, text[-3000:]
    assert "tq: error: an rpc-server stopped answering" in text, text[-3000:]
    assert "Remote RPC server crashed" in text


def test_server_outlives_a_killed_client(servers, tmp_path):
    """A client killed while weights or tokens cross the connection: the server drops it and
    answers the next one (patches/0014: a write to a closed connection no longer ends it by SIGPIPE)."""
    require_model("smollm2")
    from turboquant_llama.build import find_binary
    from turboquant_llama.models import model_path

    require_binary("llama-completion")
    (server,) = servers(1)
    cmd = [str(find_binary("llama-completion")), "-m", str(model_path("smollm2")), "--rpc", server.endpoint,
           "-ngl", str(N_LAYERS + 1), "-n", "2000", "-c", "2200", "-t", "1", "-fa", "on", "-ctk", "tq3", "-ctv", "tq2",
           "-p", PROMPT, "-no-cnv", "--ignore-eos", "--no-warmup"]
    for delay in (0.3, 1.0, 2.0):   # during the load, then (on this machine) while tokens come
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        assert server.proc.poll() is None, f"the server died with {server.proc.returncode} when its client was killed"
        rpc.probe_server(server.endpoint, timeout=30)   # and serves the next client


# --------------------------------------------------------------------------- handshake, no build needed

def test_type_count_is_the_patched_trees():
    """rpc.GGML_TYPE_COUNT is what the client compares with the server's: the value of the last patch
    (in applying order) that sets it."""
    counts = [int(m.group(1)) for p in sorted((REPO_ROOT / "patches").glob("*.patch"))
              for m in re.finditer(r"^\+\s*GGML_TYPE_COUNT\s*=\s*(\d+),", p.read_text(), re.M)]
    assert counts and counts[-1] == rpc.GGML_TYPE_COUNT


@pytest.mark.parametrize("value,message", [
    ("localhost", "is not host:port"), (":50052", "is not host:port"), ("h:0", "out of range"),
    ("h:x", "is not a TCP port"), ("[::1]:50052", "not IPv6"), ("a:1,a:1", "given twice"), ("", "is not host:port"),
])
def test_bad_server_addresses(value, message):
    with pytest.raises(ValueError, match=message):
        rpc.parse_servers(value)


def test_server_addresses():
    assert rpc.parse_servers("10.0.0.2:50052, host:7") == ["10.0.0.2:50052", "host:7"]
    assert rpc.parse_servers(["a:1", "b:2"]) == ["a:1", "b:2"]


class FakeServer:
    """Listens on loopback and answers one HELLO the way `answer` says (None: never answers)."""

    def __init__(self, answer: bytes | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.request = b""
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            while len(self.request) < 1 + 8 + rpc.RPC_CONN_CAPS_SIZE:
                chunk = conn.recv(64)
                if not chunk:
                    return
                self.request += chunk
            if self.answer is None:
                conn.recv(1)   # until the client gives up
                return
            conn.sendall(self.answer)

    def close(self):
        self.sock.close()


def _hello(major=rpc.RPC_PROTO_MAJOR, minor=rpc.RPC_PROTO_MINOR, n_types=rpc.GGML_TYPE_COUNT) -> bytes:
    return struct.pack("<Q", 4 + rpc.RPC_CONN_CAPS_SIZE) + bytes([major, minor, 0, n_types]) + bytes(rpc.RPC_CONN_CAPS_SIZE)


def test_probe_accepts_a_server_of_this_build():
    fake = FakeServer(_hello())
    try:
        assert rpc.probe_server(fake.endpoint, timeout=5) == (rpc.RPC_PROTO_MAJOR, rpc.RPC_PROTO_MINOR, 0)
        fake.thread.join(5)
        # what ggml-rpc's client sends: HELLO, its size, zero capabilities
        assert fake.request == bytes([14]) + struct.pack("<Q", 24) + bytes(24)
    finally:
        fake.close()


@pytest.mark.parametrize("answer,message", [
    (_hello(n_types=0), "stock llama.cpp rpc-server, without the TQ types"),
    (_hello(n_types=43), f"is 43 ggml types; this build has {rpc.GGML_TYPE_COUNT}"),
    (_hello(major=6), "speaks RPC protocol 6.0.0"),
    (struct.pack("<Q", 3) + b"abc", "answered the RPC handshake with 3 bytes"),
])
def test_probe_refuses_another_server(answer, message):
    fake = FakeServer(answer)
    try:
        with pytest.raises(UserError, match=message):
            rpc.probe_server(fake.endpoint, timeout=5)
    finally:
        fake.close()


def test_probe_of_a_busy_server_times_out():
    fake = FakeServer(None)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match="did not answer in 1 s .*another client"):
            rpc.probe_server(fake.endpoint, timeout=1)
        assert time.monotonic() - t0 < 5
    finally:
        fake.close()


def test_probe_of_nothing_listening():
    port = free_port()
    with pytest.raises(UserError, match=f"cannot reach an rpc-server at 127.0.0.1:{port}"):
        rpc.probe_server(f"127.0.0.1:{port}", timeout=2)


def test_rpc_without_layers_is_refused():
    with pytest.raises(UserError, match="give -ngl N"):
        rpc.check_offload(["127.0.0.1:1"], 0)


def test_serve_passes_rpc_on():
    from turboquant_llama import cli, serve

    require_binary("llama-server")
    args = cli.build_parser().parse_args(["serve", "--rpc", "127.0.0.1:5,127.0.0.1:6", "-ngl", "10"])
    cmd = serve.server_command(args, [])
    assert cmd[cmd.index("--rpc") + 1] == "127.0.0.1:5,127.0.0.1:6"
    with pytest.raises(UserError, match="use tq serve's --rpc"):
        serve.check_extra(["--rpc", "127.0.0.1:5"], allow_remote=False)


def test_rpc_server_command_refuses_an_open_address():
    from turboquant_llama import cli

    args = cli.build_parser().parse_args(["rpc-server", "--host", "0.0.0.0"])
    with pytest.raises(UserError, match="not a loopback address"):
        args.func(args)
