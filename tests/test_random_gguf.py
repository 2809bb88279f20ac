"""The random-weight GGUF of `tq bench --gpu`: the shape it claims, values that cannot be NaN, and
a file llama.cpp loads and runs with TQ caches."""

from __future__ import annotations

import json
import subprocess

import gguf
import numpy as np

from turboquant_llama import random_gguf
from turboquant_llama.build import find_binary

from .conftest import require_build


def test_random_gguf_has_the_shape_of_its_model(tmp_path):
    shape = random_gguf.SHAPES["llama-tiny"]
    path = random_gguf.write_llama(shape, tmp_path / "tiny.gguf")
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 9 * shape.n_layer
    head = shape.n_embd // shape.n_head
    assert list(tensors["blk.0.attn_k.weight"].shape) == [shape.n_embd, head * shape.n_head_kv]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [shape.n_ff, shape.n_embd]
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert int(r.fields["llama.attention.head_count_kv"].parts[-1][0]) == shape.n_head_kv
    assert int(r.fields["llama.vocab_size"].parts[-1][0]) == shape.n_vocab
    # every block's fp16 scale is the fixed finite one: random scale bits could be NaN or Inf
    blocks = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(-1, random_gguf.Q4_0_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).ravel()
    assert np.all(scales == np.float16(0.002))


def test_llama_bench_runs_a_random_gguf_with_tq_caches(tmp_path):
    require_build()
    path = random_gguf.write_llama(random_gguf.SHAPES["llama-tiny"], tmp_path / "tiny.gguf")
    out = subprocess.run([str(find_binary("llama-bench")), "-m", str(path), "-fa", "1", "-ctk", "tq3", "-ctv", "tq2",
                          "-p", "64", "-n", "8", "-r", "1", "-t", "1", "-o", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert {r["type_k"] for r in rows} == {"tq3"} and {r["type_v"] for r in rows} == {"tq2"}
    assert all(r["avg_ts"] > 0 for r in rows)
