"""Shared test helpers. Tests that need the built llama.cpp skip when it is missing, unless
TQ_REQUIRE_BUILD=1 (set by .ci/run), where a missing build is a failure."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest


def require_build() -> None:
    from turboquant_llama.build import bin_dir

    if not (bin_dir() / "libggml-base.so").exists():
        if os.environ.get("TQ_REQUIRE_BUILD") == "1":
            pytest.fail(f"the patched llama.cpp is not built in {bin_dir()}: run `tq build`")
        pytest.skip("the patched llama.cpp is not built (run `tq build`)")


def llama_completion(args: list[str]):
    """llama-completion of the build, greedy, two threads, no warm-up, not interactive: the completed
    process (stdout, stderr as text)."""
    import subprocess

    from turboquant_llama.build import find_binary

    return subprocess.run([str(find_binary("llama-completion")), "-no-cnv", "--no-warmup", "--temp", "0", "-t", "2", *args],
                          capture_output=True, text=True, errors="replace", timeout=600)


def require_binary(name: str):
    """A program `tq build` makes (llama-bench, llama-server, ...), with the same skip/fail rule."""
    require_build()
    from turboquant_llama.build import bin_dir

    path = bin_dir() / name
    if not path.exists():
        if os.environ.get("TQ_REQUIRE_BUILD") == "1":
            pytest.fail(f"{path} is not built: run `tq build`")
        pytest.skip(f"{name} is not built (run `tq build`)")
    return path


def require_model(name: str):
    from turboquant_llama.errors import UserError
    from turboquant_llama.models import model_path

    try:
        return model_path(name)
    except UserError as exc:
        if os.environ.get("TQ_REQUIRE_BUILD") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def require_llama_cpp(cuda: bool | None = None):
    """llama-cpp-python on the patched build (`tq install-python`), with the same skip/fail rule."""
    require_build()
    from turboquant_llama.errors import UserError
    from turboquant_llama.llama_python import import_llama_cpp

    try:
        return import_llama_cpp() if cuda is None else import_llama_cpp(cuda=cuda)
    except UserError as exc:
        if os.environ.get("TQ_REQUIRE_BUILD") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _default_measurement_switches(monkeypatch):
    """Tests assert the default behaviour of the patched llama.cpp: switches a developer may have
    exported for a measurement (TQ_SCALE_SEARCH=0, ...) must not leak into them."""
    from turboquant_llama.switches import ENV_NAMES

    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch) -> Path:
    """Metadata of a 2-layer model with 64-value heads and no tensors: enough for the memory
    check and the head-size check, never loaded by llama.cpp (nor calibrated: its key means are a
    path the fake programs never read)."""
    import gguf

    from turboquant_llama import calibrate

    monkeypatch.setattr(calibrate, "key_means", lambda model, *a, **k: tmp_path / "tiny-key-means.gguf")

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(512)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_context_length(2048)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_program(path: Path, body: str) -> Path:
    """A Python script standing in for a llama.cpp program."""
    path.write_text(f"#!{sys.executable}\nimport os, sys, json\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (servers in tests bind to loopback only)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, base: str, log_path, timeout: float = 120.0) -> None:
    """Poll base/health until llama-server answers 200; fail with its log's tail if the process
    exits or the time runs out (the loop is bounded)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n" + log_path.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"llama-server did not become healthy in {timeout:.0f} s")
        time.sleep(0.3)
