"""A head size the TQ types cannot serve (80, 96) stops context creation with a message that names
the head size and the types that can serve it; it never crashes and never falls back silently.
The model is a tiny random llama-architecture GGUF written here with gguf-py."""

from __future__ import annotations

import subprocess

import pytest

from turboquant_llama.build import find_binary

from .conftest import require_build
from .gguf_files import write_tiny_llama


@pytest.mark.parametrize("head_dim,ok_types", [(80, "f16, bf16"), (96, "f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl")])
@pytest.mark.parametrize("ctk,ctv", [("tq3", "f16"), ("f16", "tq2")])
def test_unsupported_head_size_is_a_clear_error(tmp_path, head_dim, ok_types, ctk, ctv):
    require_build()
    model = write_tiny_llama(tmp_path / f"tiny-h{head_dim}.gguf", head_dim)
    proc = subprocess.run([str(find_binary("llama-completion")), "-m", str(model), "-p", "hi", "-n", "1", "-c", "256",
                           "-fa", "on", "-ctk", ctk, "-ctv", ctv, "-no-cnv", "--no-warmup", "-t", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode > 0, "must fail cleanly, not crash (negative return code = signal)"
    assert f"head size {head_dim} can use {ok_types}" in proc.stderr, proc.stderr[-1500:]


def test_supported_head_size_runs(tmp_path):
    """The same tiny model at head size 64 creates its TQ context (control for the test above)."""
    require_build()
    model = write_tiny_llama(tmp_path / "tiny-h64.gguf", 64)
    proc = subprocess.run([str(find_binary("llama-completion")), "-m", str(model), "-p", "hi", "-n", "1", "-c", "256",
                           "-fa", "on", "-ctk", "tq3", "-ctv", "tq2", "-no-cnv", "--no-warmup", "-t", "1", "-v"],
                          capture_output=True, text=True, timeout=120)
    assert "K (tq3)" in proc.stderr and "V (tq2)" in proc.stderr, proc.stderr[-1500:]
