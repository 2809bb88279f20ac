"""`tq mem`: how much memory a KV cache takes, and the longest context that fits a budget, read
from a model's GGUF metadata and computed the way llama.cpp sizes its cache.

llama.cpp (at the pinned commit) allocates, per layer with a KV cache, one K tensor of
`ggml_row_size(type_k, head_dim_k * n_head_kv) * cells` bytes and one V tensor likewise; `cells`
is the context rounded up to a multiple of 256. Layers with sliding-window attention (SWA) keep
only `min(cells, pad256(n_swa + n_ubatch))` cells. The numbers here equal the
`llama_kv_cache: size = ... K (t): a MiB, V (t): b MiB` line that llama.cpp prints at context
creation (tests/test_serve_chat_mem.py checks it against llama-completion).

A TQ cache keeps its first and last `TQ_PROTECT_LAYERS` layers (default 1) at q8_0, as the patched
llama-kv-cache.cpp does; every size here counts those layers at q8_0.

Standard library only (no gguf package): a small GGUF reader that skips the tokenizer arrays is
fast even for 150k-token vocabularies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cache_types import CACHE_TYPES, is_tq
from .errors import UserError

# (values per block, bytes per block) of every cache type llama.cpp's -ctk/-ctv accept
# (ggml_blck_size / ggml_type_size; the TQ sizes are static_asserts in ggml_tq/tq-blocks.h).
TYPE_BLOCKS: dict[str, tuple[int, int]] = {n: (t.block_values, t.block_bytes) for n, t in CACHE_TYPES.items()}

# The baselines `tq mem` always compares (as K/V pairs with the same type for K and V).
BASELINES = ("f16", "q8_0", "q4_0")
DEFAULT_BUDGET_GIB = 8.0
KV_PAD = 256           # llama_context pads n_ctx to a multiple of 256 (GGML_PAD(n_ctx, 256))
DEFAULT_UBATCH = 512   # llama.cpp's default n_ubatch (enters the SWA cache size)
# llama-kv-cache.cpp (patches/0003): a TQ cache keeps the first and last N layers at q8_0, N from
# the environment variable TQ_PROTECT_LAYERS, default 1
DEFAULT_PROTECT_LAYERS = 1
PROTECTED_LAYER_TYPE = "q8_0"

# Architectures whose SWA layer pattern llama.cpp sets in code when the GGUF does not carry
# `<arch>.attention.sliding_window_pattern` (src/models/*.cpp: load_swa_pattern(ml, n, dense_first)).
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "llama4": (4, False), "exaone4": (4, False),
    "exaone-moe": (4, False), "afmoe": (4, False), "mellum": (4, False), "muse-glimmer": (4, False),
}


def row_bytes(type_name: str, n: int) -> int:
    """ggml_row_size: bytes of one row of n values of a cache type."""
    if type_name not in TYPE_BLOCKS:
        raise UserError(f"unknown cache type '{type_name}'; valid: {', '.join(TYPE_BLOCKS)}")
    blck, size = TYPE_BLOCKS[type_name]
    if n % blck:
        raise UserError(f"{type_name} stores blocks of {blck} values; a row of {n} values does not fit")
    return n // blck * size


def c_atoi(text: str | None) -> int:
    """C atoi, as the patched llama.cpp reads its switches: the leading integer, 0 when there is none."""
    m = re.match(r"\s*([-+]?\d+)", text or "")
    return int(m.group(1)) if m else 0


def protect_layers_from_env(environ: dict[str, str | None] | None = None) -> int:
    """The N of TQ_PROTECT_LAYERS as llama.cpp reads it (negative counts as 0, unset: 1)."""
    environ = os.environ if environ is None else environ
    text = environ.get("TQ_PROTECT_LAYERS")
    return DEFAULT_PROTECT_LAYERS if text is None else max(0, c_atoi(text))


# TQ switches that are on unless set to 0: TQ_KEY_CENTER (TQ K layers store k - m, m the first
# batch's mean key), TQ_EXACT_SINK (TQ layers keep the first token's K and V rows in float32). Both
# add float32 vectors per layer, once per cache, not per token.
def tq_switch_from_env(name: str, environ: dict[str, str | None] | None = None) -> bool:
    """Whether llama.cpp turns an on-by-default TQ switch on (unset: on; C atoi of the text != 0)."""
    environ = os.environ if environ is None else environ
    text = environ.get(name)
    return True if text is None else c_atoi(text) != 0


def key_center_from_env(environ: dict[str, str | None] | None = None) -> bool:
    return tq_switch_from_env("TQ_KEY_CENTER", environ)


def exact_sink_from_env(environ: dict[str, str | None] | None = None) -> bool:
    return tq_switch_from_env("TQ_EXACT_SINK", environ)


def types_for_head_size(head: int) -> list[str]:
    """Cache types whose block size divides a head size (what llama.cpp accepts with flash attention)."""
    return [t for t, (blck, _) in TYPE_BLOCKS.items() if head % blck == 0]


# --------------------------------------------------------------------------- GGUF metadata

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_ARRAY = 1 << 16   # numeric arrays longer than this (tokenizer scores, ...) are skipped


def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (v2/v3). String arrays and numeric arrays longer than
    65536 entries (the tokenizer) are skipped and stored as None."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    with f:
        def read(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise UserError(f"{path}: truncated GGUF header")
            return b

        def scalar(t: int):
            fmt = _SCALARS[t]
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def string() -> str:
            (n,) = struct.unpack("<Q", read(8))
            return read(n).decode("utf-8", errors="replace")

        def value(t: int):
            if t in _SCALARS:
                return scalar(t)
            if t == 8:
                return string()
            if t == 9:
                (et,) = struct.unpack("<I", read(4))
                (n,) = struct.unpack("<Q", read(8))
                if et in _SCALARS:
                    size = struct.calcsize(_SCALARS[et])
                    if n > _MAX_ARRAY:
                        f.seek(n * size, 1)
                        return None
                    return list(struct.unpack(f"<{n}{_SCALARS[et][1]}", read(n * size)))
                if et == 8:
                    for _ in range(n):
                        (ln,) = struct.unpack("<Q", read(8))
                        f.seek(ln, 1)
                    return None
                return [value(et) for _ in range(n)]
            raise UserError(f"{path}: unknown GGUF value type {t}")

        if read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", read(4))
        if version < 2:
            raise UserError(f"{path}: GGUF version {version} is too old (llama.cpp reads v2 and v3)")
        _, n_kv = struct.unpack("<QQ", read(16))
        meta = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack("<I", read(4))
            meta[key] = value(t)
        return meta


# --------------------------------------------------------------------------- KV shape

@dataclass(frozen=True)
class LayerKv:
    n_head_kv: int
    head_k: int
    head_v: int
    swa: bool
    il: int = 0                      # index among all layers (llama.cpp's il)

    @property
    def kind(self) -> str:
        return "swa" if self.swa else "full"


@dataclass
class KvShape:
    arch: str
    n_layer: int
    layers: list[LayerKv]            # layers that have a KV cache
    n_swa: int = 0
    n_ctx_train: int = 0
    notes: list[str] = field(default_factory=list)

    def head_sizes(self) -> tuple[set[int], set[int]]:
        return {l.head_k for l in self.layers}, {l.head_v for l in self.layers}


def _per_layer(meta: dict, key: str, n_layer: int, default=None) -> list | None:
    v = meta.get(key, default)
    if v is None:
        return None
    if isinstance(v, list):
        if len(v) < n_layer:
            raise UserError(f"GGUF key {key} has {len(v)} entries for {n_layer} layers")
        return list(v[:n_layer])
    return [v] * n_layer


def kv_shape(meta: dict) -> KvShape:
    """Per-layer KV geometry from GGUF metadata, as llama.cpp's hparams loader reads it."""
    arch = meta.get("general.architecture")
    if not arch:
        raise UserError("the GGUF has no general.architecture")
    a = arch + "."
    n_layer = meta.get(a + "block_count")
    if not n_layer:
        raise UserError(f"the GGUF has no {a}block_count")
    notes: list[str] = []
    n_head = _per_layer(meta, a + "attention.head_count", n_layer)
    if n_head is None or max(n_head) == 0:
        raise UserError(f"{arch} has no attention heads (a recurrent model has no KV cache to size)")
    n_head_kv = _per_layer(meta, a + "attention.head_count_kv", n_layer) or list(n_head)
    n_embd = meta.get(a + "embedding_length", 0)
    n_head0 = max(n_head)
    head_k_full = meta.get(a + "attention.key_length", n_embd // n_head0 if n_head0 else 0)
    head_v_full = meta.get(a + "attention.value_length", n_embd // n_head0 if n_head0 else 0)
    head_k_swa = meta.get(a + "attention.key_length_swa", head_k_full)
    head_v_swa = meta.get(a + "attention.value_length_swa", head_v_full)

    n_swa = int(meta.get(a + "attention.sliding_window", 0) or 0)
    swa = [False] * n_layer
    if n_swa > 0:
        pattern = meta.get(a + "attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern[:n_layer]]
        else:
            n_pattern, dense_first = _SWA_PATTERNS.get(arch, (None, False))
            if isinstance(pattern, int):
                n_pattern = pattern
            if n_pattern is None:
                notes.append(f"{arch} has a sliding window of {n_swa} but its SWA layer pattern is not known "
                             "here: all layers are counted as full attention (an upper bound)")
                n_swa = 0
            else:
                for il in range(n_layer):
                    swa[il] = (n_pattern == 0 or il % n_pattern != 0) if dense_first else \
                              (n_pattern == 0 or il % n_pattern < n_pattern - 1)
    if meta.get(a + "attention.kv_lora_rank"):
        notes.append("multi-head latent attention (MLA): llama.cpp caches the compressed latent, not "
                     "key_length x head_count_kv; these numbers are not exact for this model")
    if any(k.startswith(a + "ssm.") for k in meta):
        notes.append("hybrid model: the recurrent layers' state is not counted, only the attention layers' KV")
    layers = []
    for il in range(n_layer):
        if n_head_kv[il] == 0:
            continue  # no attention in this layer (recurrent / linear)
        hk, hv = (head_k_swa, head_v_swa) if swa[il] else (head_k_full, head_v_full)
        layers.append(LayerKv(int(n_head_kv[il]), int(hk), int(hv), swa[il], il))
    return KvShape(arch, int(n_layer), layers, n_swa, int(meta.get(a + "context_length", 0) or 0), notes)


def model_kv_shape(model: str | Path) -> KvShape:
    """KV geometry of a manifest model name or a GGUF path."""
    from .models import model_path

    return kv_shape(read_gguf_metadata(model_path(str(model))))


# --------------------------------------------------------------------------- sizes

def pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


def cells(n_ctx: int, swa: bool, n_swa: int, n_ubatch: int = DEFAULT_UBATCH) -> int:
    """Cache cells llama.cpp allocates for a layer (one sequence)."""
    base = pad(max(n_ctx, 1))
    if swa and n_swa > 0:
        return min(base, pad(min(base, n_swa + n_ubatch)))
    return base


@dataclass
class KvSize:
    k_type: str
    v_type: str
    n_ctx: int
    cells: int
    k_bytes: int
    v_bytes: int
    groups: list[dict]

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes


def layer_cache_types(shape: KvShape, ctk: str, ctv: str, protect: int | None = None) -> list[tuple[str, str]]:
    """The (K, V) type llama.cpp gives each layer of shape.layers: TQ types become q8_0 in the
    first and last `protect` layers (None: TQ_PROTECT_LAYERS from the environment)."""
    n = protect_layers_from_env() if protect is None else max(0, protect)
    out = []
    for layer in shape.layers:
        guarded = layer.il < n or layer.il + n >= shape.n_layer
        out.append((PROTECTED_LAYER_TYPE if guarded and is_tq(ctk) else ctk,
                    PROTECTED_LAYER_TYPE if guarded and is_tq(ctv) else ctv))
    return out


def _layer_rows(shape: KvShape, ctk: str, ctv: str, protect: int | None) -> list[tuple[LayerKv, str, str, int, int]]:
    """(layer, K type, V type, K bytes, V bytes per token) of each layer with a KV cache."""
    return [(l, kt, vt, row_bytes(kt, l.head_k * l.n_head_kv), row_bytes(vt, l.head_v * l.n_head_kv))
            for l, (kt, vt) in zip(shape.layers, layer_cache_types(shape, ctk, ctv, protect))]


def kv_size(shape: KvShape, ctk: str, ctv: str, n_ctx: int, n_ubatch: int = DEFAULT_UBATCH,
            protect: int | None = None) -> KvSize:
    """Bytes of the K and V caches llama.cpp allocates for n_ctx (rounded up as llama.cpp does),
    with a breakdown per layer type."""
    groups: dict[tuple, dict] = {}
    k_total = v_total = 0
    for layer, kt, vt, kb, vb in _layer_rows(shape, ctk, ctv, protect):
        n_cells = cells(n_ctx, layer.swa, shape.n_swa, n_ubatch)
        key = (layer.kind, layer.n_head_kv, layer.head_k, layer.head_v, kt, vt)
        g = groups.setdefault(key, {"kind": layer.kind, "layers": 0, "n_head_kv": layer.n_head_kv,
                                    "head_dim_k": layer.head_k, "head_dim_v": layer.head_v, "cells": n_cells,
                                    "k_type": kt, "v_type": vt,
                                    "k_bytes_per_token_per_layer": kb, "v_bytes_per_token_per_layer": vb,
                                    "k_bytes": 0, "v_bytes": 0})
        g["layers"] += 1
        g["k_bytes"] += kb * n_cells
        g["v_bytes"] += vb * n_cells
        k_total += kb * n_cells
        v_total += vb * n_cells
    return KvSize(ctk, ctv, n_ctx, pad(max(n_ctx, 1)), k_total, v_total, list(groups.values()))


def bytes_per_token(shape: KvShape, ctk: str, ctv: str, protect: int | None = None) -> int:
    """K+V bytes one token adds to the cache, all layers (SWA layers included: within the window)."""
    return sum(kb + vb for _, _, _, kb, vb in _layer_rows(shape, ctk, ctv, protect))


def bits_per_value(shape: KvShape, ctk: str, ctv: str, protect: int | None = None) -> float:
    """Mean of K's and V's bits per cached value over all layers (protected layers at q8_0)."""
    rows = _layer_rows(shape, ctk, ctv, protect)
    k_bits = sum(8 * kb for _, _, _, kb, _ in rows) / sum(l.head_k * l.n_head_kv for l, *_ in rows)
    v_bits = sum(8 * vb for *_, vb in rows) / sum(l.head_v * l.n_head_kv for l, *_ in rows)
    return (k_bits + v_bits) / 2.0


def kv_bytes_for_tokens(shape: KvShape, ctk: str, ctv: str, n_tokens: int, protect: int | None = None) -> int:
    """Bytes the first n_tokens of a sequence occupy (SWA layers hold at most their window)."""
    total = 0
    for l, _, _, kb, vb in _layer_rows(shape, ctk, ctv, protect):
        n = min(n_tokens, shape.n_swa) if (l.swa and shape.n_swa > 0) else n_tokens
        total += n * (kb + vb)
    return total


def max_ctx(shape: KvShape, ctk: str, ctv: str, budget_bytes: int, n_ubatch: int = DEFAULT_UBATCH,
            limit: int = 1 << 26, protect: int | None = None) -> int:
    """The largest n_ctx (a multiple of 256, as llama.cpp pads) whose cache fits budget_bytes; 0
    when not even 256 cells fit."""
    lo, hi = 0, limit // KV_PAD     # in units of 256 cells; size is monotone in n_ctx
    if kv_size(shape, ctk, ctv, hi * KV_PAD, n_ubatch, protect).total <= budget_bytes:
        return hi * KV_PAD
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kv_size(shape, ctk, ctv, mid * KV_PAD, n_ubatch, protect).total <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo * KV_PAD


def check_pair(shape: KvShape, ctk: str, ctv: str) -> None:
    """UserError when a cache type's block does not divide a head size of the model."""
    hk, hv = shape.head_sizes()
    for which, t, heads in (("K", ctk, hk), ("V", ctv, hv)):
        row_bytes(t, 0)  # validates the name
        for h in sorted(heads):
            if h % TYPE_BLOCKS[t][0]:
                raise UserError(f"{which} cache type {t} needs head sizes that are multiples of {TYPE_BLOCKS[t][0]}; "
                                f"this model's {which} head size is {h}: use one of {', '.join(types_for_head_size(h))}")


def report(model: str | Path, n_ctx: int, ctk: str, ctv: str, budget_gib: float = DEFAULT_BUDGET_GIB,
           n_ubatch: int = DEFAULT_UBATCH, protect: int | None = None) -> dict:
    protect = protect_layers_from_env() if protect is None else max(0, protect)
    shape = model_kv_shape(model)
    check_pair(shape, ctk, ctv)
    size = kv_size(shape, ctk, ctv, n_ctx, n_ubatch, protect)
    f16 = kv_size(shape, "f16", "f16", n_ctx, n_ubatch)
    budget = int(budget_gib * (1 << 30))
    pairs = {b: (b, b) for b in BASELINES}
    pairs[f"{ctk}/{ctv}"] = (ctk, ctv)
    fits = {}
    for name, (k, v) in pairs.items():
        try:
            check_pair(shape, k, v)
        except UserError:
            fits[name] = None     # the type cannot serve this model's head size
            continue
        fits[name] = max_ctx(shape, k, v, budget, n_ubatch, protect=protect)
    return {
        "model": str(model), "arch": shape.arch, "ctk": ctk, "ctv": ctv,
        "n_ctx": n_ctx, "n_ctx_cells": size.cells, "n_ctx_train": shape.n_ctx_train,
        "n_layers_kv": len(shape.layers), "n_swa": shape.n_swa,
        "protect_layers": protect if (is_tq(ctk) or is_tq(ctv)) else 0,
        "bits_per_value": bits_per_value(shape, ctk, ctv, protect),
        "kv_bytes_per_token": bytes_per_token(shape, ctk, ctv, protect),
        "kv_bytes_per_token_f16": bytes_per_token(shape, "f16", "f16"),
        "kv_bytes_total": size.total, "k_bytes_total": size.k_bytes, "v_bytes_total": size.v_bytes,
        "k_mib": size.k_bytes / 2**20, "v_mib": size.v_bytes / 2**20,
        "f16_bytes_total": f16.total, "ratio_vs_f16": f16.total / size.total,
        "layer_types": size.groups,
        "budget_gib": budget_gib, "budget_bytes": budget,
        "max_ctx": fits,
        "notes": shape.notes,
    }


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _print_report(r: dict) -> None:
    pair = f"{r['ctk']}/{r['ctv']}"
    print(f"{r['model']} ({r['arch']}, {r['n_layers_kv']} layers with a KV cache"
          + (f", sliding window {r['n_swa']}" if r["n_swa"] else "") + ")")
    print(f"KV cache {pair} at n_ctx {r['n_ctx']} ({r['n_ctx_cells']} cells):")
    print(f"  per token: {r['kv_bytes_per_token']} B ({r['kv_bytes_per_token_f16']} B with f16)")
    print(f"  total:     {_fmt_bytes(r['kv_bytes_total'])} (K {r['k_mib']:.2f} MiB + V {r['v_mib']:.2f} MiB); "
          f"f16: {_fmt_bytes(r['f16_bytes_total'])}, {r['ratio_vs_f16']:.2f}x smaller")
    if r["protect_layers"]:
        print(f"  the first and last {r['protect_layers']} layer(s) keep a q8_0 cache (TQ_PROTECT_LAYERS; 0 turns it off): "
              f"{r['bits_per_value']:.2f} bits per value on average")
    for g in r["layer_types"]:
        print(f"  {g['layers']:3d} {g['kind']:4s} layers ({g['k_type']}/{g['v_type']}): "
              f"{g['n_head_kv']} kv heads x head_dim {g['head_dim_k']}/{g['head_dim_v']}, "
              f"{g['cells']} cells, K {g['k_bytes_per_token_per_layer']} B + V {g['v_bytes_per_token_per_layer']} B "
              f"per token per layer, {_fmt_bytes(g['k_bytes'] + g['v_bytes'])}")
    print(f"Longest context for a KV budget of {r['budget_gib']:g} GiB (multiples of 256, as llama.cpp pads):")
    for name, n in r["max_ctx"].items():
        if n is None:
            print(f"  {name:14s} cannot serve this model's head size")
            continue
        over = f"  (beyond the trained context {r['n_ctx_train']})" if r["n_ctx_train"] and n > r["n_ctx_train"] else ""
        print(f"  {name:14s} {n:>12,d} tokens{over}")
    for note in r["notes"]:
        print(f"note: {note}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mem", help="KV cache memory per token and in total, and the longest context that fits a budget")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--ctx", "-c", type=int, default=4096, help="context length (default 4096)")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                   help=f"memory for the KV cache, GiB (default {DEFAULT_BUDGET_GIB:g}: what is left for the "
                        "cache on a 12-16 GB GPU after a small model's weights)")
    p.add_argument("--ubatch", type=int, default=DEFAULT_UBATCH, help="n_ubatch (sizes SWA caches; default 512)")
    p.add_argument("--protect-layers", type=int, default=None, metavar="N",
                   help="first and last N layers of a TQ cache at q8_0, as llama.cpp does with "
                        f"TQ_PROTECT_LAYERS=N (default: that variable, else {DEFAULT_PROTECT_LAYERS})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_mem)


def _cmd_mem(args: argparse.Namespace) -> int:
    if args.ctx <= 0:
        raise UserError("--ctx must be positive")
    if args.budget_gib <= 0:
        raise UserError("--budget-gib must be positive")
    if args.protect_layers is not None and args.protect_layers < 0:
        raise UserError("--protect-layers must be 0 or more")
    r = report(args.model, args.ctx, args.ctk, args.ctv, args.budget_gib, args.ubatch, args.protect_layers)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        _print_report(r)
    return 0
