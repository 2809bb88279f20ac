"""`tq mem` counts the KV cache the way llama.cpp allocates it: server slots (one stream per
sequence, or one unified stream), sliding-window caches per stream, padding. Checked against the
`llama_kv_cache: size = ...` lines llama-completion and llama-server log, for SmolLM2 and for a
small random sliding-window model (olmo2, 256-value heads, window 512) written here with gguf-py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from turboquant_llama.build import find_binary
from turboquant_llama.generate import logged_caches, parse_kv_memory
from turboquant_llama.kv_memory import Slots, kv_size
from turboquant_llama.kv_shape import model_kv_shape
from turboquant_llama.mem import allocation_summary, report, server_slots

from .conftest import require_binary, require_model
from .gguf_files import write_swa_model



@pytest.fixture(scope="module")
def swa_model(tmp_path_factory) -> Path:
    return write_swa_model(tmp_path_factory.mktemp("swa") / "olmo2-swa.gguf")


def _check(log: str, r: dict) -> None:
    caches = logged_caches(log)
    assert caches, log[-2000:]
    mem = parse_kv_memory(log)
    # the log rounds each cache to 0.01 MiB
    assert abs(mem.k_mib - r["k_mib"]) <= 0.006 * len(caches), (caches, r["k_mib"])
    assert abs(mem.v_mib - r["v_mib"]) <= 0.006 * len(caches), (caches, r["v_mib"])
    assert {c.n_seq for c in caches} == {r["n_seq"]} and {c.n_stream for c in caches} == {r["n_stream"]}
    assert caches[0].cells == r["n_ctx_cells"]


def _completion_log(model: Path, ctk: str, ctv: str, ctx: int, parallel: int, extra: list[str] = ()) -> str:
    proc = subprocess.run([str(find_binary("llama-completion")), "-m", str(model), "-p", "hi", "-n", "1", "-c", str(ctx),
                           "-np", str(parallel), "-fa", "on", "-ctk", ctk, "-ctv", ctv, "-no-cnv", "--no-warmup",
                           "-t", "1", "-v", *extra], capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _server_log(model: Path, ctk: str, ctv: str, ctx: int, args: list[str], port: int) -> str:
    """llama-server's log up to the point where it listens (then it is stopped)."""
    proc = subprocess.Popen([str(find_binary("llama-server")), "-m", str(model), "-c", str(ctx), "-fa", "on",
                             "-ctk", ctk, "-ctv", ctv, "-t", "1", "--host", "127.0.0.1", "--port", str(port), "-v",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []
    deadline = time.time() + 240
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening" in line or "main loop" in line or time.time() > deadline:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return "".join(lines)


def test_slots_layout_follows_llama_context():
    # n_ctx 1024 over 3 sequences: pad256(1024 / 3) = 512 cells each, 1536 in all
    s = Slots(1024, 3)
    assert (s.n_ctx_seq, s.n_stream) == (512, 3)
    u = Slots(1000, 4, unified=True)
    assert (u.n_ctx_seq, u.n_stream) == (1024, 1)
    # sliding window 512: per stream pad256(min(n_ctx_seq, 512 + n_ubatch)); unified: 512 x 4 + 512
    assert Slots(8192, 4).cells(True, 512) == 1024
    assert Slots(8192, 4, unified=True).cells(True, 512) == 2560
    assert Slots(8192, 4, swa_full=True).cells(True, 512) == 2048
    assert Slots(300).cells(True, 512) == 512    # n_ubatch is at most n_ctx (300): pad256(min(512, 812))
    with pytest.raises(Exception, match="n_ctx_seq"):
        Slots(256, 300).n_ctx_seq
    assert server_slots(8192, None) == Slots(8192, 4, unified=True)
    assert server_slots(8192, 4) == Slots(8192, 4, unified=False)
    assert server_slots(8192, 2, ["-kvu"]).unified and server_slots(8192, 2, ["--swa-full"]).swa_full


# llama-completion has no --kv-unified: the unified layout is checked against llama-server below
@pytest.mark.parametrize("ctk,ctv,ctx,parallel", [("tq3", "tq2", 1024, 3), ("tq3", "tq2", 4096, 1), ("q8_0", "tq3", 2000, 4)])
def test_mem_equals_llama_completion_smollm2(ctk, ctv, ctx, parallel):
    require_binary("llama-completion")
    model = require_model("smollm2")
    r = report("smollm2", ctx, ctk, ctv, n_seq=parallel)
    _check(_completion_log(model, ctk, ctv, ctx, parallel), r)


@pytest.mark.parametrize("parallel", [1, 2, 4])
def test_mem_equals_llama_completion_sliding_window(swa_model, parallel):
    require_binary("llama-completion")
    shape = model_kv_shape(swa_model)
    assert shape.n_swa == 512 and [l.swa for l in shape.layers] == [True, True, True, False]
    assert {l.head_k for l in shape.layers} == {256}
    r = report(swa_model, 8192, "tq3", "tq2", n_seq=parallel)
    log = _completion_log(swa_model, "tq3", "tq2", 8192, parallel)
    _check(log, r)
    assert len(logged_caches(log)) == 2   # the full-attention cache and the sliding-window cache


def test_mem_equals_llama_server_allocation(swa_model):
    """The issue's case: a sliding-window model at ctx 8192 under `tq serve` (4 slots: one stream
    each) and under a plain llama-server (automatic slots: 4, unified)."""
    require_binary("llama-server")
    smollm2 = require_model("smollm2")
    served = report(swa_model, 8192, "tq3", "tq2", n_seq=4)
    _check(_server_log(swa_model, "tq3", "tq2", 8192, ["--parallel", "4"], 18391), served)
    single = report(swa_model, 8192, "tq3", "tq2")
    assert served["kv_bytes_total"] > single["kv_bytes_total"]   # four sliding-window caches, not one
    auto = server_slots(8192, None)
    r = report(swa_model, 8192, "tq3", "tq2", n_seq=auto.n_seq, unified=auto.unified)
    _check(_server_log(swa_model, "tq3", "tq2", 8192, [], 18392), r)
    r = report("smollm2", 8192, "tq3", "tq2", n_seq=4)
    _check(_server_log(smollm2, "tq3", "tq2", 8192, ["--parallel", "4"], 18393), r)


def test_mem_parallel_cli(swa_model):
    import json

    from turboquant_llama.cli import main

    shape = model_kv_shape(swa_model)
    one = kv_size(shape, "f16", "f16", Slots(8192, 1)).total
    four = kv_size(shape, "f16", "f16", Slots(8192, 4)).total
    # three SWA layers of 1 KV head x 256 values, K and V at 2 bytes: 1024 cells once, 4 x 1024 with 4 slots;
    # protected layers are q8_0 only for TQ types
    assert four - one == 3 * 2 * 256 * 2 * (4 * 1024 - 1024)
    line = allocation_summary(shape, "f16", "f16", server_slots(8192, 4))
    assert line.startswith(f"KV cache f16/f16: {four / 2**20:.2f} MiB allocated for 4 slots of 2048 cells")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["mem", "--model", str(swa_model), "--ctx", "8192", "--ctk", "f16", "--ctv", "f16",
                     "--parallel", "4", "--json"]) == 0
    d = json.loads(out.getvalue())
    assert d["kv_bytes_total"] == four and d["n_seq"] == 4 and d["n_stream"] == 4 and d["n_ctx_cells"] == 2048
    with pytest.raises(SystemExit):
        main(["mem", "--model", str(swa_model), "--parallel", "0"])
