"""NumPy reference of the tq3c block (tq-blocks.h): 64 calibrated key coefficients at 3.25 bits.

The cache stores coefficients z of the key, not the key: z = ((k - m) T) / sigma per layer and KV head
(issue 18: m the calibration mean, T the query-whitened KLT, sigma each coefficient's calibration
standard deviation), so every coefficient has unit variance over the calibration text. A block codes
64 of them with one fixed profile of bits (the most to the first position), the Gaussian Lloyd-Max
codebook of each bit count, and one fp16 gain, the block's rms. The profile is SmolLM2's shared
profile (results/key-code-sim.md: a type carries no per-layer parameters; the flatter of the two
measured profiles, which costs Qwen2.5-Coder-0.5B 2% against its own allocations).

This module writes the bytes that the C reference (tq.c) writes: the same float32 and double
operations in the same order.
"""

from __future__ import annotations

import functools

import numpy as np

from .key_code import gaussian_lloyd_max

QK_TQ3C = 64
BLOCK_BYTES = 26
# bits of positions 0..63: 192 in all, 24 bytes of indices + the 2-byte gain = tq3's 26 bytes
TQ3C_PROFILE = (7, 6, 6, *[5] * 8, *[4] * 10, *[3] * 17, *[2] * 17, *[1] * 8, 0)
assert len(TQ3C_PROFILE) == QK_TQ3C and sum(TQ3C_PROFILE) == 8 * (BLOCK_BYTES - 2)


@functools.lru_cache(maxsize=None)
def gauss_codebook_f32(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, boundaries) of the b-bit Lloyd-Max quantizer of N(0, 1) as float32, each rounded
    once from double: the tables of tq-codebooks.h."""
    c, b, _ = gaussian_lloyd_max(bits)
    return np.asarray(c, dtype=np.float32), np.asarray(b, dtype=np.float32)


def _bit_offsets() -> np.ndarray:
    return np.concatenate(([0], np.cumsum(TQ3C_PROFILE)[:-1])).astype(np.int64)


def quantize_blocks(z: np.ndarray, tq3_blocks: bool = True) -> np.ndarray:
    """float32 coefficients [n, 64] -> uint8 blocks [n, 26] (tq-blocks.h, tq3c steps 1-5; without
    step 5 with tq3_blocks=False, the calibrated code alone, for measurements)."""
    z = np.ascontiguousarray(z, dtype=np.float32).reshape(-1, QK_TQ3C)
    n = z.shape[0]
    out = np.zeros((n, BLOCK_BYTES), dtype=np.uint8)
    zd = z.astype(np.float64)
    s = np.zeros(n, dtype=np.float64)
    for j in range(QK_TQ3C):                       # the reference's order: j ascending
        s = s + zd[:, j] * zd[:, j]
    finite = np.isfinite(s)
    with np.errstate(invalid="ignore", over="ignore"):   # an rms beyond fp16's range is an Inf gain, as in C
        g16 = np.where(finite, np.sqrt(np.where(finite, s, 0.0) / QK_TQ3C).astype(np.float32).astype(np.float16),
                       np.float16(np.nan))
    g = g16.astype(np.float32)
    live = finite & (g > 0)
    gain_bits = np.where(live, g16.view(np.uint16), np.where(finite, 0, 0x7E00)).astype(np.uint16)
    out[:, 0] = (gain_bits & 0xFF).astype(np.uint8)
    out[:, 1] = (gain_bits >> 8).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(live[:, None], z / np.where(live, g, np.float32(1.0))[:, None], np.float32(0.0)).astype(np.float32)
    stream = np.zeros((n, 8 * (BLOCK_BYTES - 2)), dtype=np.uint8)   # one bit per byte, LSB-first
    for j, (bits, off) in enumerate(zip(TQ3C_PROFILE, _bit_offsets())):
        if bits == 0:
            continue
        _, bounds = gauss_codebook_f32(bits)
        idx = np.sum(u[:, j:j + 1] > bounds[None, :], axis=1).astype(np.int64)
        idx = np.where(live, idx, 0)
        for i in range(bits):
            stream[:, off + i] = (idx >> i) & 1
    out[:, 2:] = np.packbits(stream.reshape(n, -1, 8), axis=2, bitorder="little").reshape(n, -1)
    if tq3_blocks:
        _tq3c_or_tq3(z, out, live & np.isfinite(g))
    return out


def _tq3c_or_tq3(z: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
    """tq-blocks.h tq3c step 5: each of the rows' blocks becomes the tq3 block of its values (norm's
    sign bit set) where that is closer to z by the profile's weights 4^bits."""
    from .layout import dequantize_rows, quantize_rows

    idx = np.where(rows)[0]
    if idx.size == 0:
        return
    zr = z[idx]
    zc = dequantize_blocks(out[idx])
    t = quantize_rows(zr, "tq3")
    z3 = dequantize_rows(t, "tq3")
    ec = np.zeros(idx.size)
    e3 = np.zeros(idx.size)
    for j, bits in enumerate(TQ3C_PROFILE):    # the reference's order: j ascending
        w = float(4 ** bits)
        dc = (zc[:, j] - zr[:, j]).astype(np.float64)
        d3 = (z3[:, j] - zr[:, j]).astype(np.float64)
        ec = ec + w * (dc * dc)
        e3 = e3 + w * (d3 * d3)
    use = idx[e3 < ec]
    out[use] = t[e3 < ec]
    out[use, 1] |= 0x80


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 blocks [n, 26] -> float32 coefficients [n, 64]: gain * centroid (0 where a position has
    no bits); a NaN gain gives NaN everywhere, as a NaN row would travel through f16."""
    from .layout import dequantize_rows

    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    n = blocks.shape[0]
    as_tq3 = (blocks[:, 1] & 0x80) != 0            # tq-blocks.h tq3c step 5
    if as_tq3.any():
        z = dequantize_blocks(np.where(as_tq3[:, None], 0, blocks).astype(np.uint8))
        t = blocks[as_tq3].copy()
        t[:, 1] &= 0x7F
        z[as_tq3] = dequantize_rows(t, "tq3")
        return z
    g = blocks[:, :2].copy().view(np.float16).reshape(n).astype(np.float32)
    stream = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.int64)
    z = np.zeros((n, QK_TQ3C), dtype=np.float32)
    for j, (bits, off) in enumerate(zip(TQ3C_PROFILE, _bit_offsets())):
        if bits == 0:
            with np.errstate(invalid="ignore"):   # Inf gain * 0 is NaN, as in C
                z[:, j] = g * np.float32(0.0)
            continue
        idx = np.zeros(n, dtype=np.int64)
        for i in range(bits):
            idx |= stream[:, off + i] << i
        z[:, j] = g * gauss_codebook_f32(bits)[0][idx]
    return z


# --- the per layer and KV head transform (what the calibration file holds) ------------------------

def coefficient_order(d: int) -> np.ndarray:
    """rank[p]: which coefficient (by descending variance) goes to position p of a row of d. Block b
    of the row takes ranks b, b + nb, b + 2 nb, ... so that every block sees the whole spectrum and
    one fixed profile fits each (its position 0 gets the block's largest coefficient)."""
    nb = d // QK_TQ3C
    pos = np.arange(d)
    return (pos % QK_TQ3C) * nb + pos // QK_TQ3C


def key_transforms(k: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W_k, W_q) of one layer and KV head from its calibration keys k [n, d] (centred by the caller)
    and queries q [n, g, d]: z = k W_k are the coefficients a tq3c block codes (unit variance over
    the calibration rows, in coefficient_order), and (q W_q) . z = q . k, so attention runs on the
    coefficients with the query transformed once. Both float64 [d, d]."""
    from .key_code import calibrate_key_code

    d = k.shape[1]
    code = calibrate_key_code(k, q, 3.25)     # the bits are the type's profile; only the transform counts
    by_rank = np.argsort(-code.sigma, kind="stable")[coefficient_order(d)]
    w_k = (code.transform / code.sigma)[:, by_rank]
    w_q = ((code.inverse * code.sigma[:, None])[by_rank, :]).T
    return w_k, w_q


def measure_blocks(model: str, eval_text: str, n_tokens: int = 1024) -> dict:
    """The query error of tq3c as the cache would run it: the calibration file's transforms
    (`tq calibrate --tq3c`), the blocks of this module, scores (q W_q) . z~ against q . k; beside
    tq3 on the same centred keys. Geometric means over layer-heads: {"tq3", "tq3c"}."""
    from gguf import GGUFReader

    from .calibrate import tq3c_transforms
    from .key_code import _tq_round_trip, query_error
    from .kv_dump import dump_kv
    from .models import model_path

    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in GGUFReader(tq3c_transforms(model)).tensors}
    ev = dump_kv(model_path(model), eval_text, n_tokens=n_tokens, n_threads=2)
    err: dict[str, list[float]] = {"tq3": [], "tq3c": []}
    for il in range(len(ev["Kcur"])):
        k_all, q_all = ev["Kcur"][il][1:].astype(np.float64), ev["Qcur"][il][1:].astype(np.float64)
        hkv, d = k_all.shape[1], k_all.shape[2]
        g = q_all.shape[1] // hkv
        mean = t[f"tq3c_k_mean.{il}"].reshape(hkv, d)
        for h in range(hkv):
            k, q = k_all[:, h] - mean[h], q_all[:, h * g:(h + 1) * g].reshape(-1, d)
            z = (k @ t[f"tq3c_k_transform.{il}"][h]).astype(np.float32)
            z_hat = dequantize_blocks(quantize_blocks(z)).reshape(z.shape).astype(np.float64)
            s, s_hat = q @ k.T, (q @ t[f"tq3c_q_transform.{il}"][h]) @ z_hat.T
            err["tq3c"].append(float(np.mean((s - s_hat) ** 2) / np.mean(s * s)))
            err["tq3"].append(query_error(q, k, _tq_round_trip(k, "tq3")))
    return {name: float(np.exp(np.mean(np.log(v)))) for name, v in err.items()}


# --- what attention sees: the output error, not the score error ---------------------------------

def _split_name(split: tuple[int, int, int]) -> str:
    n, hi, lo = split
    return f"split {n}@{hi}+{QK_TQ3C - n}@{lo}"


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    s = q @ k.T / np.sqrt(q.shape[1]) + np.triu(np.full((n, n), -np.inf), 1)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


def measure_attention(model: str, eval_text: str, n_tokens: int = 768,
                      splits: tuple[tuple[int, int, int], ...] = ()) -> dict:
    """The relative error of each query head's causal attention output (exact values, position 0's
    key exact as the cache's sink, positions 1.. averaged) with tq3 and tq4 keys and with tq3c keys
    through the calibration file's transforms (with and without tq-blocks.h's step 5, the blocks
    that tq3 codes better stored as tq3), per layer-head of the TQ layers (not the first and last).
    splits: the paper's outlier split (n channels, bits, rest's bits) per 64 values, its channels
    chosen on the calibration text's keys and queries (key_code). {name: [(layer, head, error)]}
    plus {"tq3_blocks": the fraction of tq3c blocks stored as tq3}."""
    from gguf import GGUFReader

    from .calibrate import calibration_text, tq3c_transforms
    from .key_code import _tq_round_trip, calibrate_outlier_split, outlier_split_round_trip
    from .kv_dump import dump_kv
    from .models import model_path

    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in GGUFReader(tq3c_transforms(model)).tensors}
    ev = dump_kv(model_path(model), eval_text, n_tokens=n_tokens, n_threads=2)
    cal = dump_kv(model_path(model), calibration_text(), n_tokens=1024, n_threads=2) if splits else None
    out: dict = {"tq3": [], "tq4": [], "tq3c": [], "tq3c without step 5": []} | {_split_name(s): [] for s in splits}
    chosen = []
    for il in range(1, len(ev["Kcur"]) - 1):
        k_all, q_all, v_all = (np.asarray(ev[x][il], dtype=np.float64) for x in ("Kcur", "Qcur", "Vcur"))
        hkv, d = k_all.shape[1], k_all.shape[2]
        g = q_all.shape[1] // hkv
        mean = t[f"tq3c_k_mean.{il}"].reshape(hkv, d)
        for h in range(hkv):
            k, v = k_all[:, h] - mean[h], v_all[:, h]
            z = (k @ t[f"tq3c_k_transform.{il}"][h]).astype(np.float32)
            blocks = quantize_blocks(z)
            chosen.append(float(np.mean((blocks.reshape(z.shape[0], -1, BLOCK_BYTES)[1:, :, 1] & 0x80) != 0)))
            zc = dequantize_blocks(blocks).reshape(z.shape).astype(np.float64)
            zp = dequantize_blocks(quantize_blocks(z, tq3_blocks=False)).reshape(z.shape).astype(np.float64)
            plain = {"tq3": _tq_round_trip(k, "tq3"), "tq4": _tq_round_trip(k, "tq4")}
            for sp in splits:
                kc = np.asarray(cal["Kcur"][il], dtype=np.float64)[1:, h] - mean[h]
                qc = np.asarray(cal["Qcur"][il], dtype=np.float64)[1:, h * g:(h + 1) * g]
                n_out = sp[0] * d // QK_TQ3C
                plain[_split_name(sp)] = outlier_split_round_trip(calibrate_outlier_split(kc, qc, n_out, sp[1], sp[2]), k)
            for kk in plain.values():
                kk[0] = k[0]
            zc[0], zp[0] = z[0], z[0]
            for j in range(g):
                q = q_all[:, h * g + j]
                o = _causal_attention(q, k, v)
                qz = q @ t[f"tq3c_q_transform.{il}"][h]
                coded = [(name, _causal_attention(q, kk, v)) for name, kk in plain.items()]
                for name, oo in coded + [("tq3c", _causal_attention(qz, zc, v)),
                                         ("tq3c without step 5", _causal_attention(qz, zp, v))]:
                    err = np.sum((oo - o) ** 2, axis=1) / np.sum(o ** 2, axis=1)
                    out[name].append((il, h * g + j, float(np.mean(err[1:]))))
    out["tq3_blocks"] = float(np.mean(chosen))
    return out
