"""A model's KV-cache geometry from its GGUF metadata (read with gguf-py), as llama.cpp's hparams
loader reads it: per layer the KV heads, the K and V head sizes and whether the layer uses a
sliding window; and the one check that a cache type can serve those head sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .cache_types import CACHE_TYPES, TQ_NAMES
from .errors import UserError

# Architectures whose SWA layer pattern llama.cpp sets in code when the GGUF does not carry
# `<arch>.attention.sliding_window_pattern` (src/models/*.cpp: load_swa_pattern(ml, n, dense_first)).
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "llama4": (4, False), "exaone4": (4, False),
    "exaone-moe": (4, False), "afmoe": (4, False), "mellum": (4, False), "muse-glimmer": (4, False),
    "olmo2": (4, False), "plamo3": (8, False), "gpt-oss": (2, False), "laguna": (4, True),
    "smallthinker": (4, True), "modern-bert": (3, True),
}


# --------------------------------------------------------------------------- GGUF metadata

def read_gguf_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file; the tokenizer's arrays (tokenizer.ggml.*) are left out."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return dict(_read_metadata(str(path.resolve()), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=16)
def _read_metadata(path: str, size: int, mtime_ns: int) -> tuple:
    # cached by file identity: gguf-py parses every field, the vocabulary's too (~1 s for 50k tokens)
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable GGUF file: {exc}") from None
    meta = []
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml."):
            continue
        meta.append((key, fld.contents()))
    return tuple(meta)


# --------------------------------------------------------------------------- head sizes

class HeadSizeError(UserError, ValueError):
    """A cache type's block does not divide a head size (UserError for tq, ValueError for
    load_llama's callers)."""


def types_for_head_size(head: int) -> list[str]:
    """Cache types whose block size divides a head size (what llama.cpp accepts with flash attention)."""
    return [name for name, t in CACHE_TYPES.items() if head % t.block_values == 0]


def check_head_size(ctk: str, ctv: str, head_k: int | list[int] | set[int],
                    head_v: int | list[int] | set[int] | None = None) -> None:
    """HeadSizeError when a cache type's block (64 values for the TQ types, 32 for q8_0/q4_0, ...)
    does not divide the model's K or V head size; the message names the head size and the types
    that can serve it. Unknown type names raise HeadSizeError too, listing the valid ones."""
    heads_k = [head_k] if isinstance(head_k, int) else sorted(set(head_k))
    heads_v = heads_k if head_v is None else ([head_v] if isinstance(head_v, int) else sorted(set(head_v)))
    for which, name, heads in (("K", ctk, heads_k), ("V", ctv, heads_v)):
        t = CACHE_TYPES.get(name.lower()) if isinstance(name, str) else None
        if t is None:
            raise HeadSizeError(f"unknown KV cache type {name!r}; valid: {', '.join(CACHE_TYPES)}")
        for h in heads:
            if h % t.block_values:
                kind = "TurboQuant types store blocks" if t.name in TQ_NAMES else f"{t.name} stores blocks"
                raise HeadSizeError(f"{which} cache type {t.name} cannot serve head size {h}: {kind} of "
                                    f"{t.block_values} values, so the head size must be a multiple of "
                                    f"{t.block_values}; for head size {h} use {', '.join(types_for_head_size(h))}")


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

    def check_types(self, ctk: str, ctv: str) -> None:
        """HeadSizeError when ctk or ctv cannot serve this model's head sizes."""
        check_head_size(ctk, ctv, *self.head_sizes())


def _per_layer(meta: dict, key: str, n_layer: int, default=None) -> list | None:
    v = meta.get(key, default)
    if v is None:
        return None
    if isinstance(v, list):
        if len(v) < n_layer:
            raise UserError(f"GGUF key {key} has {len(v)} entries for {n_layer} layers")
        return list(v[:n_layer])
    return [v] * n_layer


def _swa_layers(meta: dict, arch: str, n_layer: int, n_swa: int, notes: list[str]) -> tuple[list[bool], int]:
    a = arch + "."
    swa = [False] * n_layer
    if n_swa <= 0:
        return swa, 0
    pattern = meta.get(a + "attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(x) for x in pattern[:n_layer]], n_swa
    n_pattern, dense_first = _SWA_PATTERNS.get(arch, (None, False))
    if isinstance(pattern, int):
        n_pattern = pattern
    if n_pattern is None:
        notes.append(f"{arch} has a sliding window of {n_swa} but its SWA layer pattern is not known "
                     "here: all layers are counted as full attention (an upper bound)")
        return swa, 0
    for il in range(n_layer):
        swa[il] = (n_pattern == 0 or il % n_pattern != 0) if dense_first else \
                  (n_pattern == 0 or il % n_pattern < n_pattern - 1)
    return swa, n_swa


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
    swa, n_swa = _swa_layers(meta, arch, n_layer, int(meta.get(a + "attention.sliding_window", 0) or 0), notes)
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
