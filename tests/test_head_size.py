"""A head size the TQ types cannot serve (80, 96) stops context creation with a message that names
the head size and the types that can serve it; it never crashes and never falls back silently.
The model is a tiny random llama-architecture GGUF written here with gguf-py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from turboquant_llama.build import find_binary

from .conftest import require_build


def write_tiny_llama(path: Path, head_dim: int, n_head: int = 2, n_vocab: int = 64, n_ff: int = 64) -> Path:
    import gguf

    n_embd = head_dim * n_head
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    t("output.weight", n_vocab, n_embd)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, np.float32))
    t("blk.0.attn_q.weight", n_embd, n_embd)
    t("blk.0.attn_k.weight", n_embd, n_embd)
    t("blk.0.attn_v.weight", n_embd, n_embd)
    t("blk.0.attn_output.weight", n_embd, n_embd)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, np.float32))
    t("blk.0.ffn_gate.weight", n_ff, n_embd)
    t("blk.0.ffn_up.weight", n_ff, n_embd)
    t("blk.0.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
