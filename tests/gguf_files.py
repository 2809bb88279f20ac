"""Small GGUF files the tests write with gguf-py: metadata only, or a tiny random model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np


def write_gguf(path: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """A GGUF of one architecture whose keys and tensors fill() adds."""
    w = gguf.GGUFWriter(str(path), arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_metadata_gguf(path: Path, arch: str, n_layer: int, n_embd: int, n_head: int, n_head_kv: int | list[int],
                        more: Callable[[gguf.GGUFWriter], None] | None = None, **keys) -> Path:
    """A GGUF with attention metadata and no tensors (llama.cpp cannot load it; the tools that
    read its metadata can). keys: more GGUFWriter.add_<key>(value) calls, e.g. context_length=2048;
    more: a function that adds anything else."""
    def fill(w: gguf.GGUFWriter) -> None:
        w.add_block_count(n_layer)
        w.add_embedding_length(n_embd)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        for key, value in keys.items():
            getattr(w, f"add_{key}")(value)
        if more is not None:
            more(w)

    return write_gguf(path, arch, fill)


def write_tiny_llama(path: Path, head_dim: int, n_head: int = 2, n_vocab: int = 64, n_ff: int = 64) -> Path:
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


def write_swa_model(path: Path, n_layer: int = 4, head_dim: int = 256, window: int = 512) -> Path:
    """A random olmo2 GGUF with a sliding window: layers 0-2 of every 4 use the window (llama.cpp's
    default olmo2 pattern), layer 3 full attention; 2 query heads, 1 KV head of head_dim values."""
    n_head, n_head_kv, n_vocab, n_ff = 2, 1, 64, 64
    n_embd = head_dim * n_head
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "olmo2")
    w.add_context_length(16384)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(window)
    # a small SentencePiece vocabulary: llama-completion tokenizes its prompt
    tokens = ["<unk>", "<s>", "</s>", "\u2581"] + [chr(c) for c in range(ord("a"), ord("a") + n_vocab - 4)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [1] * (n_vocab - 3))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    ones("output_norm.weight", n_embd)
    t("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        ones(f"blk.{i}.attn_q_norm.weight", n_embd)
        ones(f"blk.{i}.attn_k_norm.weight", n_head_kv * head_dim)
        ones(f"blk.{i}.post_attention_norm.weight", n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        ones(f"blk.{i}.post_ffw_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
