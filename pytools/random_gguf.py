"""GGUF files of a real model's shape with random weights, for speed measurements where the real
weights cannot travel (the GPU machine has no network; an 8B model is 4.7 GB): llama.cpp's time per
token depends on the shapes and types, not on the values. Never use one for quality.

    python3 -m turboquant_llama.random_gguf llama-3.1-8b OUT.gguf
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_theta: float
    n_ctx_train: int


SHAPES = {
    "llama-3.1-8b": LlamaShape(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256,
                               rope_theta=500000.0, n_ctx_train=131072),
    # for tests: loads in a second
    "llama-tiny": LlamaShape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512,
                             rope_theta=10000.0, n_ctx_train=4096),
}

Q4_0_BLOCK = 32
Q4_0_BYTES = 18


def random_q4_0(rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Q4_0 blocks with a fixed small scale (random fp16 bits could be NaN) and random nibbles."""
    blocks = rng.integers(0, 256, size=(n_rows * n_cols // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return blocks.reshape(n_rows, n_cols // Q4_0_BLOCK * Q4_0_BYTES)


def write_llama(shape: LlamaShape, out: Path, seed: int = 0) -> Path:
    import gguf  # the patched tree's gguf-py or the installed package

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("random-weights")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # no tokenizer: llama-bench feeds token ids; the vocabulary size sizes the output layer
    w.add_vocab_size(shape.n_vocab)
    w.add_tokenizer_model("none")

    q4 = gguf.GGMLQuantizationType.Q4_0
    head = shape.n_embd // shape.n_head
    kv = head * shape.n_head_kv

    def add_q4(name: str, n_out: int, n_in: int) -> None:
        w.add_tensor(name, random_q4_0(rng, n_out, n_in), raw_dtype=q4)  # shape in bytes, as gguf-py takes it

    def add_norm(name: str) -> None:
        w.add_tensor(name, np.ones(shape.n_embd, dtype=np.float32))

    add_q4("token_embd.weight", shape.n_vocab, shape.n_embd)
    add_norm("output_norm.weight")
    add_q4("output.weight", shape.n_vocab, shape.n_embd)
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        add_norm(p + "attn_norm.weight")
        add_q4(p + "attn_q.weight", shape.n_embd, shape.n_embd)
        add_q4(p + "attn_k.weight", kv, shape.n_embd)
        add_q4(p + "attn_v.weight", kv, shape.n_embd)
        add_q4(p + "attn_output.weight", shape.n_embd, shape.n_embd)
        add_norm(p + "ffn_norm.weight")
        add_q4(p + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        add_q4(p + "ffn_up.weight", shape.n_ff, shape.n_embd)
        add_q4(p + "ffn_down.weight", shape.n_embd, shape.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    return out


def cached(shape: str) -> Path:
    """The random-weight GGUF of a shape in the cache, written on first use (about 20 s for 8B)."""
    from .upstream import cache_dir

    if shape not in SHAPES:
        raise UserError(f"no random-weight shape '{shape}': choose from {', '.join(sorted(SHAPES))}")
    out = cache_dir() / "models" / f"random-{shape}-q4_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"tq: writing {out} (random weights of {shape}'s shape, for speed only)", file=sys.stderr)
        tmp = out.with_suffix(".tmp")
        write_llama(SHAPES[shape], tmp)
        tmp.rename(out)
    return out


def is_random(model: str) -> bool:
    return Path(model).name.startswith("random-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a random-weight GGUF of a real model's shape (speed only)")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        print(write_llama(SHAPES[a.shape], a.out, a.seed))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
