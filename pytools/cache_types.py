"""The KV-cache types of the patched llama.cpp (`-ctk/-ctv`, `type_k/type_v`): one table of ggml
type ids, block sizes and bytes per block, and the parser of "K/V" type lists."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class CacheType:
    name: str
    ggml_id: int        # enum ggml_type (TQ ids added by patches/0001)
    block_values: int   # ggml_blck_size
    block_bytes: int    # ggml_type_size (TQ sizes: static_asserts in ggml_tq/tq-blocks.h)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.block_bytes / self.block_values


CACHE_TYPES: dict[str, CacheType] = {
    t.name: t
    for t in (
        CacheType("f32", 0, 1, 4), CacheType("f16", 1, 1, 2), CacheType("bf16", 30, 1, 2),
        CacheType("q8_0", 8, 32, 34), CacheType("q5_1", 7, 32, 24), CacheType("q5_0", 6, 32, 22),
        CacheType("q4_1", 3, 32, 20), CacheType("q4_0", 2, 32, 18), CacheType("iq4_nl", 20, 32, 18),
        CacheType("tq4", 45, 64, 34), CacheType("tq3", 44, 64, 26), CacheType("tq2", 43, 64, 18),
        CacheType("tq4_qjl", 48, 64, 34), CacheType("tq3_qjl", 47, 64, 26), CacheType("tq2_qjl", 46, 64, 18),
        CacheType("tq3c", 51, 64, 26), CacheType("tq2o", 52, 64, 24), CacheType("tq3o", 53, 64, 32),
    )
}
TQ_NAMES = ("tq2", "tq3", "tq4", "tq2_qjl", "tq3_qjl", "tq4_qjl", "tq3c", "tq2o", "tq3o")
# calibrated key types: K only, with the model's `tq calibrate --tq3c` file (tq3c) or `--split` file
# (tq2o, tq3o: the outlier split)
KEY_ONLY_NAMES = ("tq3c", "tq2o", "tq3o")
SPLIT_NAMES = ("tq2o", "tq3o")


def cache_type(name: str) -> CacheType:
    if name not in CACHE_TYPES:
        raise UserError(f"unknown cache type '{name}'; valid: {', '.join(CACHE_TYPES)}")
    return CACHE_TYPES[name]


def bits_per_value(name: str) -> float:
    """Bits per cached value, block norms and scales included."""
    return cache_type(name).bits_per_value


def is_tq(name: str) -> bool:
    return name in TQ_NAMES


def parse_type_specs(text: str, example: str = "f16,q4_0,tq3/tq2") -> list[tuple[str, str]]:
    """"f16,tq3/tq2" -> [("f16", "f16"), ("tq3", "tq2")]: "X" is K = V = X, "X/Y" is K = X, V = Y.
    Duplicates are dropped, order kept; unknown names raise UserError listing the valid ones."""
    pairs: list[tuple[str, str]] = []
    items = [s.strip() for s in (text or "").split(",")]
    if not any(items):
        raise UserError(f"the list of cache types is empty; give a comma-separated list such as {example}")
    for item in filter(None, items):
        parts = [p.strip().lower() for p in item.split("/")]
        if len(parts) > 2 or not all(parts):
            raise UserError(f"bad cache type spec '{item}': use X (K = V = X) or X/Y (K = X, V = Y)")
        for p in parts:
            if p not in CACHE_TYPES or p == "f32":
                valid = ", ".join(n for n in CACHE_TYPES if n != "f32")
                raise UserError(f"unknown cache type '{p}' in '{item}'; valid types: {valid}")
        pair = (parts[0], parts[-1])
        if pair[1] in KEY_ONLY_NAMES:
            raise UserError(f"'{item}': {pair[1]} is a key type (K only); give V another type, e.g. {pair[1]}/tq3")
        if pair not in pairs:
            pairs.append(pair)
    return pairs
