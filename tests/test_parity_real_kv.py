"""The parity checks of test_parity_c on real K and V rows: what SmolLM2 (head size 64, 3 KV heads,
30 layers) writes to its KV cache for a ~100-token wikitext prompt, dumped through the scheduler's
eval callback (f16 cache, flash attention: Kcur after RoPE and Vcur are the float rows a TQ cache
quantizes). Real K caches have a few huge channels per head; synthetic rows only imitate that.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from turboquant_llama import layout
from turboquant_llama.corpus import wikitext2_test_path
from turboquant_llama.layout import QK_TQ, TQ_TYPES

from .conftest import require_build, require_model
from .test_parity_c import EPS32, _dot_bound

WIKITEXT = wikitext2_test_path()   # the packaged WikiText-2 test text
FALLBACK_TEXT = (
    "Robert Boulter is an English film , television and theatre actor . He had a guest starring role on "
    "the television series The Bill in 2000 . This was followed by a starring role in the play Herons "
    "written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre . He had a guest "
    "role in the television series Judge John Deed in 2002 . In 2004 Boulter landed a role as \" Craig \" "
    "in the episode \" Teddy 's Story \" of the television series The Long Firm ; he starred alongside "
    "actors Mark Strong and Derek Jacobi ."
)
N_TOKENS = 96
N_LAYERS = 30
N_HEAD_KV = 3
HEAD_DIM = 64


def _prompt() -> str:
    if WIKITEXT.exists():
        lines = [ln.strip() for ln in WIKITEXT.read_text(encoding="utf-8").splitlines() if len(ln.strip()) > 40]
        return " ".join(lines[:8])
    return FALLBACK_TEXT


def _import_llama_cpp():
    from turboquant_llama.errors import UserError
    from turboquant_llama.llama_python import import_llama_cpp

    try:
        return import_llama_cpp(cuda=False)
    except UserError as exc:
        if os.environ.get("TQ_REQUIRE_BUILD") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def lib():
    require_build()
    from turboquant_llama.ggml_lib import load

    return load()


@pytest.fixture(scope="module")
def kv():
    """One model load, one llama_decode: per layer Kcur (tokens, 3, 64), Vcur, Qcur (tokens, 9, 64)."""
    require_build()
    model = require_model("smollm2")
    llama_cpp = _import_llama_cpp()
    from turboquant_llama.kv_dump import dump_kv

    d = dump_kv(model, _prompt(), n_tokens=N_TOKENS, n_threads=1, llama_cpp=llama_cpp)
    n = d["n_tokens"]
    assert n >= 64, f"prompt gave only {n} tokens"
    for kind in ("Kcur", "Vcur"):
        assert len(d[kind]) == N_LAYERS, f"{kind}: {len(d[kind])} layers dumped; names seen: {d['names'][:8]}"
        for a in d[kind]:
            assert a.shape == (n, N_HEAD_KV, HEAD_DIM) and np.all(np.isfinite(a))
    assert len(d["Qcur"]) == N_LAYERS
    K = np.stack(d["Kcur"])  # (layers, tokens, heads, d)
    V = np.stack(d["Vcur"])
    Q = np.stack(d["Qcur"])  # (layers, tokens, 9, d): query head h reads KV head h // 3
    group = Q.shape[2] // N_HEAD_KV
    return {"K": K, "V": V, "Q": Q[:, :, ::group, :], "n": n}  # one query head per KV head


def _cache_rows(a: np.ndarray) -> np.ndarray:
    """Rows of 192 values per token and layer: the cache's row layout (3 heads x 64)."""
    return np.ascontiguousarray(a.reshape(-1, N_HEAD_KV * HEAD_DIM), dtype=np.float32)


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_real_kv_quantized_bytes_identical(lib, kv, type_name):
    bs = TQ_TYPES[type_name].type_size
    for which in ("K", "V"):
        x = _cache_rows(kv[which])
        c_ref = lib.quantize_rows(x, type_name)
        c_cpu = lib.quantize_rows(x, type_name, cpu=True)  # SET_ROWS / CPY path
        numpy = layout.quantize_rows(x, type_name)
        assert np.array_equal(c_ref, c_cpu), which
        differing = int(np.any((c_ref != numpy).reshape(x.shape[0], -1, bs), axis=2).sum())
        assert differing <= max(1, x.size // QK_TQ // 10_000), f"{which}: {differing} blocks differ"


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_real_k_vec_dot_with_real_queries(lib, kv, type_name):
    """Each real K row against the query of a later token of the same layer and heads (what
    attention computes), every SIMD level within the float32 bound of test_parity_c."""
    K, Q, n = kv["K"], kv["Q"], kv["n"]
    perm = np.roll(np.arange(n), -7)  # token t's key meets token (t + 7) mod n's query
    x = _cache_rows(K)
    q = _cache_rows(Q[:, perm])
    raw = layout.quantize_rows(x, type_name)
    exact = layout.vec_dot_rows(raw, q, type_name)
    bound = _dot_bound(type_name, raw, q)
    top = lib.set_simd_level(99)
    try:
        for simd in range(top + 1):
            lib.set_simd_level(simd)
            got = lib.vec_dot_rows(raw, q, type_name).astype(np.float64)
            err = np.abs(got - exact)
            assert np.all(err <= bound), f"simd level {simd}: worst err/bound {np.max(err / bound):.3g}"
    finally:
        lib.set_simd_level(99)


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_real_v_accumulation_in_rotated_domain(lib, kv, type_name):
    """Softmax-like weights over the tokens of one layer and head: the rotated-domain
    accumulation equals the weighted sum of dequantized real V rows."""
    rng = np.random.default_rng(5)
    V = kv["V"]
    top = lib.set_simd_level(99)
    try:
        for layer in (0, 1, 14, 29):
            for head in range(N_HEAD_KV):
                x = np.ascontiguousarray(V[layer, :, head, :], dtype=np.float32)
                s = rng.standard_normal(x.shape[0]) * 3
                w = (np.exp(s - s.max()) / np.exp(s - s.max()).sum()).astype(np.float32)
                raw = layout.quantize_rows(x, type_name)
                ref = (w[:, None].astype(np.float64) * layout.dequantize_rows(raw, type_name)).sum(axis=0)
                mag = (np.abs(w[:, None]) * np.abs(layout.dequantize_rows_rotated(raw, type_name))).sum(axis=0)
                bound = (x.shape[0] + 18) * EPS32 * np.sqrt(QK_TQ) * mag.max() + 1e-30
                for simd in range(top + 1):
                    lib.set_simd_level(simd)
                    got = lib.mad_rotated(raw, type_name, x.shape[1], w).astype(np.float64)
                    assert np.all(np.abs(got - ref) <= bound), f"layer {layer} head {head} simd level {simd}"
                lib.set_simd_level(99)
    finally:
        lib.set_simd_level(99)


def test_real_kv_relative_mse_ordered(kv):
    """Relative MSE sum|x - x^|^2 / sum|x|^2 on the real rows: finite, and more bits -> less error."""
    rel: dict[str, dict[str, float]] = {}
    for which in ("K", "V"):
        x = _cache_rows(kv[which]).astype(np.float64)
        for t in sorted(TQ_TYPES):
            y = layout.dequantize_rows(layout.quantize_rows(x.astype(np.float32), t), t).astype(np.float64)
            rel.setdefault(which, {})[t] = float(np.sum((x - y) ** 2) / np.sum(x ** 2))
    K = kv["K"]
    ch_rms = np.sqrt(np.mean(K.astype(np.float64) ** 2, axis=1))  # (layers, heads, d)
    outlier = float(np.median(ch_rms.max(axis=2) / np.median(ch_rms, axis=2)))
    print(f"\nreal KV rows ({kv['n']} tokens x {N_LAYERS} layers x {N_HEAD_KV} heads x {HEAD_DIM}): "
          f"K max/median channel rms, median over layers/heads: {outlier:.1f}")
    for which, per in rel.items():
        print(f"  {which} relative MSE: " + ", ".join(f"{t} {v:.4g}" for t, v in per.items()))
    for which, per in rel.items():
        assert all(np.isfinite(v) and v > 0 for v in per.values()), per
        assert per["tq4"] < per["tq3"] < per["tq2"], f"{which}: {per}"
