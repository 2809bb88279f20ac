"""The bytes of a KV cache as llama.cpp (the pinned commit, patched) allocates them.

llama_context (src/llama-context.cpp) pads n_ctx to a multiple of 256; with a unified cache
(`--kv-unified`, what llama-server picks when the slot count is automatic) every sequence shares
one stream of n_ctx cells, otherwise each of the n_seq_max sequences (server slots, `--parallel`)
gets its own stream of n_ctx_seq = pad256(n_ctx / n_seq_max) cells. n_ubatch is min(n_ctx,
n_batch, n_ubatch). Per layer with a KV cache (src/llama-kv-cache.cpp) one K tensor of
`ggml_row_size(type_k, head_dim_k * n_head_kv)` bytes per cell and stream, and one V tensor
likewise. Layers with sliding-window attention (src/llama-kv-cache-iswa.cpp) keep a cache of
pad256(min(n_ctx_seq, n_swa * (n_seq_max if unified else 1) + n_ubatch)) cells per stream
(`--swa-full`: n_ctx_seq). The totals equal the `llama_kv_cache: size = ...` lines llama.cpp logs
(one per cache; a sliding-window model has two), which the tests check against llama-completion
and llama-server.

A TQ cache keeps its first and last `protect` layers (the option tq_protect_layers, default 1) at
q8_0, as the patched llama-kv-cache.cpp does; every size here counts those layers at q8_0.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache_types import CACHE_TYPES, is_tq
from .errors import UserError
from .kv_shape import KvShape, LayerKv
from .switches import BY_NAME, from_env

KV_PAD = 256           # llama_context pads n_ctx (and n_ctx_seq, and the SWA cache) to a multiple of 256
DEFAULT_UBATCH = 512   # llama.cpp's default n_ubatch (enters the SWA cache size)
DEFAULT_BATCH = 2048   # llama.cpp's default n_batch (n_ubatch is at most n_batch and n_ctx)
DEFAULT_PROTECT_LAYERS = int(BY_NAME["protect_layers"].default)
PROTECTED_LAYER_TYPE = "q8_0"


def row_bytes(type_name: str, n: int) -> int:
    """ggml_row_size: bytes of one row of n values of a cache type."""
    t = CACHE_TYPES.get(type_name)
    if t is None:
        raise UserError(f"unknown cache type '{type_name}'; valid: {', '.join(CACHE_TYPES)}")
    if n % t.block_values:
        raise UserError(f"{type_name} stores blocks of {t.block_values} values; a row of {n} values does not fit")
    return n // t.block_values * t.block_bytes


def pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Slots:
    """How llama.cpp lays out the cells of a context: n_seq_max sequences, unified or one stream each."""
    n_ctx: int                 # as asked (-c)
    n_seq: int = 1             # n_seq_max: server slots (--parallel), llama-cpp-python's n_seq_max
    unified: bool = False      # --kv-unified
    n_ubatch: int = DEFAULT_UBATCH
    n_batch: int = DEFAULT_BATCH
    swa_full: bool = False     # --swa-full

    def __post_init__(self):
        if self.n_ctx <= 0:
            raise UserError("the context must be positive")
        if self.n_seq < 1:
            raise UserError("the number of sequences (slots) must be at least 1")
        if self.n_ubatch < 1 or self.n_batch < 1:
            raise UserError("n_batch and n_ubatch must be at least 1")

    @property
    def n_ctx_padded(self) -> int:
        return pad(self.n_ctx)

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq

    @property
    def n_ctx_seq(self) -> int:
        """Cells per stream of a full-attention layer (llama_context's n_ctx_seq)."""
        if self.unified:
            return self.n_ctx_padded
        cells = pad(self.n_ctx_padded // self.n_seq)
        if cells == 0:
            raise UserError(f"a context of {self.n_ctx} cannot be split into {self.n_seq} sequences "
                            "(llama.cpp: n_ctx_seq == 0)")
        return cells

    @property
    def ubatch(self) -> int:
        return min(self.n_ctx, self.n_batch, self.n_ubatch)

    def cells(self, swa: bool, n_swa: int) -> int:
        """Cells per stream of a layer."""
        base = self.n_ctx_seq
        if not swa or n_swa <= 0 or self.swa_full:
            return base
        return pad(min(base, n_swa * (self.n_seq if self.unified else 1) + self.ubatch))


@dataclass
class KvSize:
    k_type: str
    v_type: str
    n_ctx: int
    cells: int                 # cells per stream of a full-attention layer
    n_stream: int
    k_bytes: int
    v_bytes: int
    groups: list[dict]

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes


def protect_layers(protect: int | None = None) -> int:
    """protect as given, or (None) the protected layers llama.cpp uses under this environment."""
    return int(from_env()["protect_layers"]) if protect is None else max(0, protect)


def layer_cache_types(shape: KvShape, ctk: str, ctv: str, protect: int | None = None) -> list[tuple[str, str]]:
    """The (K, V) type llama.cpp gives each layer of shape.layers: TQ types become q8_0 in the
    first and last `protect` layers (None: as llama.cpp does under this environment)."""
    n = protect_layers(protect)
    out = []
    for layer in shape.layers:
        guarded = layer.il < n or layer.il + n >= shape.n_layer
        out.append((PROTECTED_LAYER_TYPE if guarded and is_tq(ctk) else ctk,
                    PROTECTED_LAYER_TYPE if guarded and is_tq(ctv) else ctv))
    return out


def _layer_rows(shape: KvShape, ctk: str, ctv: str, protect: int) -> list[tuple[LayerKv, str, str, int, int]]:
    """(layer, K type, V type, K bytes, V bytes per token) of each layer with a KV cache."""
    return [(l, kt, vt, row_bytes(kt, l.head_k * l.n_head_kv), row_bytes(vt, l.head_v * l.n_head_kv))
            for l, (kt, vt) in zip(shape.layers, layer_cache_types(shape, ctk, ctv, protect))]


def kv_size(shape: KvShape, ctk: str, ctv: str, n_ctx: int | Slots, n_ubatch: int = DEFAULT_UBATCH,
            protect: int | None = None) -> KvSize:
    """Bytes of the K and V caches llama.cpp allocates for a context (n_ctx: one sequence with
    this n_ubatch, or a Slots layout), with a breakdown per kind of layer."""
    slots = n_ctx if isinstance(n_ctx, Slots) else Slots(n_ctx, n_ubatch=n_ubatch)
    groups: dict[tuple, dict] = {}
    k_total = v_total = 0
    for layer, kt, vt, kb, vb in _layer_rows(shape, ctk, ctv, protect):
        n_cells = slots.cells(layer.swa, shape.n_swa) * slots.n_stream
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
    return KvSize(ctk, ctv, slots.n_ctx, slots.n_ctx_seq, slots.n_stream, k_total, v_total, list(groups.values()))


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


def max_ctx(shape: KvShape, ctk: str, ctv: str, budget_bytes: int, slots: Slots | None = None,
            limit: int = 1 << 26, protect: int | None = None) -> int:
    """The largest n_ctx (a multiple of 256 per sequence, as llama.cpp pads) whose cache fits
    budget_bytes with the slots' layout (its n_ctx is ignored); 0 when not even that fits."""
    slots = slots or Slots(1)
    step = KV_PAD * (1 if slots.unified else slots.n_seq)   # n_ctx values that give whole streams

    def fits(n: int) -> bool:
        return n > 0 and kv_size(shape, ctk, ctv, _with_ctx(slots, n), protect=protect).total <= budget_bytes

    lo, hi = 0, limit // step     # in units of step; size is monotone in n_ctx
    if fits(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid
    return lo * step


def _with_ctx(slots: Slots, n_ctx: int) -> Slots:
    return Slots(n_ctx, slots.n_seq, slots.unified, slots.n_ubatch, slots.n_batch, slots.swa_full)
