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


def quantize_blocks(z: np.ndarray) -> np.ndarray:
    """float32 coefficients [n, 64] -> uint8 blocks [n, 26] (tq-blocks.h, tq3c steps 1-4)."""
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
    return out


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """uint8 blocks [n, 26] -> float32 coefficients [n, 64]: gain * centroid (0 where a position has
    no bits); a NaN gain gives NaN everywhere, as a NaN row would travel through f16."""
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    n = blocks.shape[0]
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

TQ3C_SELECT_WEIGHTS = 4.0 ** np.asarray(TQ3C_PROFILE, dtype=np.float64)   # water-filling: bits ~ log4 of a weight


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = k.shape[0]
    s = q @ k.T / np.sqrt(q.shape[1]) + np.triu(np.full((n, n), -np.inf), 1)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


def measure_attention(model: str, eval_text: str, n_tokens: int = 768) -> dict:
    """The relative error of each query head's causal attention output (exact values, position 0's
    key exact as the cache's sink, positions 1.. averaged) with tq3 keys and with tq3c keys through
    the calibration file's transforms, per layer-head of the TQ layers (not the first and last), and
    with a hybrid that codes each tq3c block as whichever of tq3c and tq3-on-the-coefficients has
    the lower error weighted by 4^bits (TQ3C_SELECT_WEIGHTS: what the profile's bits say a
    coefficient is worth). {name: [(layer, head, error)]} plus {"hybrid_tq3_blocks": fraction}."""
    from gguf import GGUFReader

    from .calibrate import tq3c_transforms
    from .key_code import _tq_round_trip
    from .kv_dump import dump_kv
    from .models import model_path

    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in GGUFReader(tq3c_transforms(model)).tensors}
    ev = dump_kv(model_path(model), eval_text, n_tokens=n_tokens, n_threads=2)
    out: dict = {"tq3": [], "tq3c": [], "hybrid": []}
    chosen = []
    for il in range(1, len(ev["Kcur"]) - 1):
        k_all, q_all, v_all = (np.asarray(ev[x][il], dtype=np.float64) for x in ("Kcur", "Qcur", "Vcur"))
        hkv, d = k_all.shape[1], k_all.shape[2]
        g = q_all.shape[1] // hkv
        mean = t[f"tq3c_k_mean.{il}"].reshape(hkv, d)
        for h in range(hkv):
            k, v = k_all[:, h] - mean[h], v_all[:, h]
            z = (k @ t[f"tq3c_k_transform.{il}"][h]).astype(np.float32)
            zc = dequantize_blocks(quantize_blocks(z)).reshape(z.shape).astype(np.float64)
            z3 = _tq_round_trip(z.astype(np.float64), "tq3")
            zh = zc.copy()
            for b in range(d // QK_TQ3C):
                sl = slice(QK_TQ3C * b, QK_TQ3C * (b + 1))
                use3 = (np.sum(TQ3C_SELECT_WEIGHTS * (z3[:, sl] - z[:, sl]) ** 2, axis=1)
                        < np.sum(TQ3C_SELECT_WEIGHTS * (zc[:, sl] - z[:, sl]) ** 2, axis=1))
                zh[use3, sl] = z3[use3, sl]
                chosen.append(float(use3[1:].mean()))
            k3 = _tq_round_trip(k, "tq3")
            k3[0], zc[0], zh[0] = k[0], z[0], z[0]
            for j in range(g):
                q = q_all[:, h * g + j]
                o = _causal_attention(q, k, v)
                qz = q @ t[f"tq3c_q_transform.{il}"][h]
                for name, oo in (("tq3", _causal_attention(q, k3, v)), ("tq3c", _causal_attention(qz, zc, v)),
                                 ("hybrid", _causal_attention(qz, zh, v))):
                    err = np.sum((oo - o) ** 2, axis=1) / np.sum(o ** 2, axis=1)
                    out[name].append((il, h * g + j, float(np.mean(err[1:]))))
    out["hybrid_tq3_blocks"] = float(np.mean(chosen))
    return out
