"""Dump the real K, V (and Q) rows a model writes to its KV cache, through llama-cpp-python's
low-level API and the scheduler's eval callback (cb_eval), on the CPU build.

    from turboquant_llama.kv_dump import dump_kv
    d = dump_kv(model_path("smollm2"), text, n_tokens=96)
    d["Kcur"][layer]  # float32 (n_tokens, n_head_kv, head_dim): what the cache stores for that layer

The cache is f16 with flash attention on, so Kcur/Vcur are the float rows (after RoPE for K) that
a TQ cache would quantize. The last tensor named "Kcur-<il>" / "Vcur-<il>" computed in a layer is
kept (llama.cpp names the tensor before and after RoPE alike).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1
PREFIXES = ("Kcur-", "Vcur-", "Qcur-")


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml/include/ggml.h (field order and sizes copied)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _tensor_array(t: GgmlTensor) -> np.ndarray | None:
    """A float32 copy of a host tensor, shaped (ne3, ne2, ne1, ne0); None for other types."""
    if not t.data or t.type not in (GGML_TYPE_F32, GGML_TYPE_F16):
        return None
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    dtype = np.float32 if t.type == GGML_TYPE_F32 else np.float16
    itemsize = np.dtype(dtype).itemsize
    if nb[0] != itemsize:
        return None
    span = sum((ne[i] - 1) * nb[i] for i in range(GGML_MAX_DIMS)) + itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    a = np.ndarray(shape=tuple(ne[::-1]), dtype=dtype, buffer=buf, strides=tuple(nb[::-1]))
    return np.array(a, dtype=np.float32)  # copies: handles non-contiguous views


def load_cpu_model(llama_cpp, model: str | Path):
    """The model loaded by llama-cpp-python's low-level API with no layer offloaded, llama-cpp-python's
    log silenced (errors only); free it with llama_cpp.llama_model_free."""
    try:
        from llama_cpp._logger import set_verbose

        set_verbose(False)
    except ImportError:
        pass
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mdl = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
    if not mdl:
        raise RuntimeError(f"could not load {model}")
    return mdl


def dump_kv(model: str | Path, text: str, n_tokens: int = 96, n_threads: int = 1, llama_cpp=None) -> dict:
    """Run one llama_decode of the first n_tokens tokens of text; return
    {"Kcur": [per layer (n_tokens, n_head_kv, d)], "Vcur": [...], "Qcur": [... (n_tokens, n_head, d)],
     "n_tokens": n, "names": sorted set of names seen}."""
    return dump_kv_chunks(model, text, n_tokens, [0], n_threads, llama_cpp)[0]


def dump_kv_chunks(model: str | Path, text: str, chunk: int, positions: list[int] | Callable[[int], list[int]],
                   n_threads: int = 1, llama_cpp=None) -> list[dict]:
    """dump_kv of consecutive chunks of text's tokens, chunk i (tokens [i*chunk, (i+1)*chunk)) decoded
    alone, its first token at position positions[i]. RoPE makes attention depend on relative
    positions only, so a chunk sees what it would at position 0, and its K rows are those a cache
    holds at those positions: statistics over a long context without attending over all of it.
    positions may be a function of the number of whole chunks the text has. Fewer dicts than
    positions when the text runs out of tokens."""
    if llama_cpp is None:
        from .llama_python import import_llama_cpp

        llama_cpp = import_llama_cpp(cuda=False)
    lc = llama_cpp
    seen: dict[str, dict[int, np.ndarray]] = {p[:-1]: {} for p in PREFIXES}
    names: set[str] = set()

    def cb(t_ptr, ask, _user):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode("utf-8", "replace")
        if not name.startswith(PREFIXES):
            return False if ask else True
        if ask:
            return True
        names.add(name)
        kind, _, layer = name.partition("-")
        try:
            il = int(layer)
        except ValueError:
            return True
        a = _tensor_array(t)
        if a is not None:
            seen[kind][il] = a  # the last computed one in the layer wins (after RoPE)
        return True

    callback = lc.ggml_backend_sched_eval_callback(cb)
    mdl = load_cpu_model(lc, model)
    ctx = None
    dumps: list[dict] = []
    try:
        vocab = lc.llama_model_get_vocab(mdl)
        raw = text.encode()
        toks = (lc.llama_token * (len(raw) + 16))()
        n = lc.llama_tokenize(vocab, raw, len(raw), toks, len(toks), True, False)
        if n < 0:
            raise RuntimeError("tokenize failed")
        n_text = n
        n = min(n, chunk)
        if callable(positions):
            positions = positions(max(1, n_text // chunk))
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = max(256, n)
        cparams.n_batch = cparams.n_ubatch = max(n, 32)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.type_k = cparams.type_v = GGML_TYPE_F16
        cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        cparams.offload_kqv = False
        ctx = lc.llama_init_from_model(mdl, cparams)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        for i, pos0 in enumerate(positions):
            t0 = i * chunk
            m = min(n, n_text - t0)
            if m <= 0 or (i > 0 and m < n):
                break
            batch = lc.llama_batch_init(m, 0, 1)
            try:
                for j in range(m):
                    batch.token[j] = toks[t0 + j]
                    batch.pos[j] = pos0 + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = j == m - 1
                batch.n_tokens = m
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                rc = lc.llama_decode(ctx, batch)
            finally:
                lc.llama_batch_free(batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            dumps.append(_collected(seen, names, m))
            for per_layer in seen.values():
                per_layer.clear()
    finally:
        if ctx:
            lc.llama_free(ctx)
        lc.llama_model_free(mdl)

    return dumps


def _collected(seen: dict[str, dict[int, np.ndarray]], names: set[str], n: int) -> dict:
    out: dict = {"n_tokens": n, "names": sorted(names)}
    for kind, per_layer in seen.items():
        layers = []
        for il in sorted(per_layer):
            a = per_layer[il]  # (ne3, ne2=tokens, ne1=heads, ne0=d) for Kcur/Vcur/Qcur
            a = a.reshape(-1, a.shape[-2], a.shape[-1]) if a.ndim >= 3 else a
            layers.append(a)
        out[kind] = layers
    return out
