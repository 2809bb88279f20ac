"""NumPy reference of `tq3c`, a calibrated, query-aware key code (issue 18), and its measurement.

tq's keys are coded blind to the data: after a random rotation every direction looks alike, so 3
bits per value cannot get below Lloyd-Max's 3-bit distortion in any direction. Attention only sees
the error along the queries, e = k - k^ enters as q.e, and real keys and queries are far from
isotropic. Per layer and KV head, calibrated once on a text that ships with the project:

    A = (C_q + eps I)^1/2      whitens by the queries: |A e|^2 averages to E (q.e)^2
    U = KLT of A C_k A         decorrelates the whitened keys; lam = its eigenvalues
    bits_i                     greedy water-filling of an integer bit budget over lam
    c = k A U                  coefficients; each coded by the Gaussian Lloyd-Max codebook of
                               its bit count, scaled by sigma_i = sqrt(lam_i) and a per-row gain

This is a simulation of the code's error on real rows, not a block layout nor a llama.cpp type.
"""

from __future__ import annotations

import dataclasses
import functools
import lzma
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr, ndtri

# the most bits one coefficient gets (uint8 indices); the measurement reports how often it binds
MAX_BITS = 8
GAIN_BITS = 16          # the fp16 per-row gain, charged like tq's fp16 norm per 64 values
BLOCK = 64
# C_q's ridge, relative to its mean eigenvalue: A must be invertible to decode k^ in the original
# domain, and directions no query visits should cost few bits, not infinitely few
QUERY_RIDGE = 1e-3
_SQRT_2PI = math.sqrt(2.0 * math.pi)


@functools.lru_cache(maxsize=None)
def gaussian_lloyd_max(bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(centroids, boundaries, mse) of the b-bit Lloyd-Max quantizer of N(0, 1); 0 bits: the
    single centroid 0 with mse 1. Newton's method on Lloyd's fixed point c = E[x | cell(c)] from
    the quantile initialisation: plain Lloyd iterations need ~1e5 steps at 8 bits, Newton a few
    dozen (each centroid depends only on its neighbours' midpoints, so the Jacobian is tridiagonal)."""
    if bits == 0:
        return np.zeros(1), np.zeros(0), 1.0
    n = 2 ** bits
    c = ndtri((np.arange(n) + 0.5) / n)
    rows = np.arange(n)
    for _ in range(200):
        mid = (c[1:] + c[:-1]) / 2
        lo, hi = np.concatenate(([-np.inf], mid)), np.concatenate((mid, [np.inf]))
        pdf_lo, pdf_hi = np.exp(-lo * lo / 2) / _SQRT_2PI, np.exp(-hi * hi / 2) / _SQRT_2PI
        p = ndtr(hi) - ndtr(lo)
        m = (pdf_lo - pdf_hi) / p   # E[x | lo < x < hi] of the standard normal
        residual = c - m
        if np.max(np.abs(residual)) < 1e-10:   # float64 noise in the tails is ~1e-11
            break
        # dm/dlo = pdf(lo) (m - lo) / p, dm/dhi = pdf(hi) (hi - m) / p; 0 at the infinite ends
        d_lo = np.concatenate(([0.0], pdf_lo[1:] * (m[1:] - lo[1:]) / p[1:]))
        d_hi = np.concatenate((pdf_hi[:-1] * (hi[:-1] - m[:-1]) / p[:-1], [0.0]))
        jac = np.diag(1.0 - 0.5 * (d_lo + d_hi))
        jac[rows[1:], rows[1:] - 1] = -0.5 * d_lo[1:]
        jac[rows[:-1], rows[:-1] + 1] = -0.5 * d_hi[:-1]
        c = c - np.linalg.solve(jac, residual)
    # N(0, 1) is even: exactly antisymmetric centroids, so the middle boundary is exactly 0 and not
    # the solver's rounding (whose sign changed with the LAPACK build, and with it tq-codebooks.h)
    c = 0.5 * (c - c[::-1])
    edges = (c[1:] + c[:-1]) / 2
    p = np.diff(ndtr(np.concatenate(([-np.inf], edges, [np.inf]))))
    # at the centroid condition, E (x - Q(x))^2 = E x^2 - E Q(x)^2
    return c, edges, float(1.0 - np.sum(p * c * c))


def _mse_table() -> np.ndarray:
    return np.array([gaussian_lloyd_max(b)[2] for b in range(MAX_BITS + 1)])


@dataclass(frozen=True)
class KeyCode:
    transform: np.ndarray   # [d, d] T = A U: coefficients c = k T
    inverse: np.ndarray     # [d, d] T^-1 = U^T A^-1: k^ = c^ T^-1
    bits: np.ndarray        # int [d] bits of each coefficient
    sigma: np.ndarray       # [d] standard deviation of each coefficient over the calibration rows

    @property
    def dim(self) -> int:
        return int(self.bits.shape[0])

    def total_bits(self) -> int:
        """Bits per row, every gain charged as tq charges its norms (16 bits per 64 values)."""
        return int(self.bits.sum()) + GAIN_BITS * math.ceil(self.dim / BLOCK)


def coefficient_budget(d: int, bits_per_value: float) -> int:
    """Bits for the coefficients of one row: bits_per_value * d minus 16 per 64 values for the gain,
    so that tq3c at 3.25 bits/value costs no more than tq3 (26 bytes per 64 values, norm included).
    One gain per row is stored; for d > 64 the rest of that charge is left unspent."""
    return int(math.floor(bits_per_value * d)) - GAIN_BITS * math.ceil(d / BLOCK)


def allocate_bits(lam: np.ndarray, budget: int) -> np.ndarray:
    """Greedy water-filling: each bit goes where it removes most distortion, lam_i (D(b) - D(b+1)).
    Greedy is optimal here because D(b) - D(b+1) falls with b (the marginal returns diminish)."""
    mse = _mse_table()
    step = np.append(mse[:-1] - mse[1:], -np.inf)   # a coefficient at MAX_BITS gets no more
    bits = np.zeros(len(lam), dtype=np.int64)
    for _ in range(max(budget, 0)):
        gain = lam * step[bits]
        i = int(np.argmax(gain))
        if not gain[i] > 0:
            break
        bits[i] += 1
    return bits


def calibrate_key_code(k: np.ndarray, q: np.ndarray, bits_per_value: float) -> KeyCode:
    """A KeyCode for one layer and KV head from keys k [n, d] (centred by the caller) and the
    queries q [n, g, d] of that KV head's g query heads."""
    k = np.asarray(k, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    d = k.shape[1]
    qr = q.reshape(-1, d)
    # the second moment, not the centred covariance: E (q.e)^2 = e^T E[q q^T] e whatever q's mean
    c_q = qr.T @ qr / len(qr)
    c_k = k.T @ k / len(k)
    w, v = np.linalg.eigh(c_q)
    w = np.maximum(w, 0.0) + QUERY_RIDGE * max(float(np.mean(w)), np.finfo(float).tiny)
    a = (v * np.sqrt(w)) @ v.T
    a_inv = (v / np.sqrt(w)) @ v.T
    lam, u = np.linalg.eigh(a @ c_k @ a)
    lam = np.maximum(lam, 0.0)
    bits = allocate_bits(lam, coefficient_budget(d, bits_per_value))
    # a coefficient of zero variance gets no bits; its sigma only has to be a safe divisor
    sigma = np.where(lam > 0, np.sqrt(lam), 1.0)
    return KeyCode(transform=a @ u, inverse=u.T @ a_inv, bits=bits, sigma=sigma)


def encode_keys(code: KeyCode, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys [n, d] -> (indices uint8 [n, d], gains float16 [n]). The gain is the rms of the row's
    whitened coefficients (c / sigma), rounded to fp16 as tq rounds its norm; a zero row has gain 0."""
    z = (np.asarray(k, dtype=np.float64) @ code.transform) / code.sigma
    gains = np.sqrt(np.mean(z * z, axis=1)).astype(np.float16)
    g = gains.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(g[:, None] > 0, z / g[:, None], 0.0)
    idx = np.zeros(z.shape, dtype=np.uint8)
    for b in np.unique(code.bits):
        if b == 0:
            continue
        cols = code.bits == b
        idx[:, cols] = np.searchsorted(gaussian_lloyd_max(int(b))[1], z[:, cols])
    return idx, gains


def decode_keys(code: KeyCode, indices: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """(indices, gains) -> k^ [n, d]; coefficients of 0 bits decode to 0."""
    z = np.zeros(indices.shape, dtype=np.float64)
    for b in np.unique(code.bits):
        if b == 0:
            continue
        cols = code.bits == b
        z[:, cols] = gaussian_lloyd_max(int(b))[0][indices[:, cols]]
    return (z * gains.astype(np.float64)[:, None] * code.sigma) @ code.inverse


def query_error(q: np.ndarray, k: np.ndarray, k_hat: np.ndarray) -> float:
    """mean (q.(k - k^))^2 / mean (q.k)^2 over every (query, key) pair; q [..., d]."""
    q = np.asarray(q, dtype=np.float64).reshape(-1, k.shape[1])
    k = np.asarray(k, dtype=np.float64)
    s = q @ k.T
    e = q @ (k - np.asarray(k_hat, dtype=np.float64)).T
    return float(np.mean(e * e) / np.mean(s * s))


def shared_profile(codes: list[KeyCode]) -> np.ndarray:
    """One bit profile for many calibrated codes, what a ggml type (which carries no per-layer
    parameters) could fix: each allocation sorted from the most bits down, averaged over the codes,
    rounded down, and the budget restored at the ranks the rounding shortened most. Returns the
    profile from the largest coefficient to the smallest."""
    sorted_bits = np.array([np.sort(c.bits)[::-1] for c in codes], dtype=np.float64)
    mean = sorted_bits.mean(axis=0)
    profile = np.floor(mean).astype(np.int64)
    budget = int(codes[0].bits.sum())
    order = np.argsort(-(mean - profile), kind="stable")
    profile[order[:budget - int(profile.sum())]] += 1
    return np.sort(profile)[::-1]


def with_profile(code: KeyCode, profile: np.ndarray) -> KeyCode:
    """The code with its bits replaced by profile, the most to the coefficient of largest sigma."""
    bits = np.empty_like(code.bits)
    bits[np.argsort(-code.sigma, kind="stable")] = profile
    return dataclasses.replace(code, bits=bits)


# --- the paper's outlier split (TurboQuant section 4.3), for comparison -------------------------

@dataclass(frozen=True)
class OutlierSplit:
    """Two independent TurboQuant_mse codes over a head's channels: the n_out channels of most
    calibrated key x query energy at bits_hi, the rest at bits_lo, each group with its own norm."""
    outliers: np.ndarray    # int [n_out] channel indices
    bits_hi: int
    bits_lo: int

    def total_bits(self, d: int) -> int:
        """Bits per row: both groups' indices and two fp16 norms."""
        n_out = len(self.outliers)
        return n_out * self.bits_hi + (d - n_out) * self.bits_lo + 2 * GAIN_BITS


def calibrate_outlier_split(k: np.ndarray, q: np.ndarray, n_out: int, bits_hi: int, bits_lo: int) -> OutlierSplit:
    """The outlier channels of one layer and KV head: largest E[k_j^2] E[q_j^2] over the calibration
    keys k [n, d] (centred by the caller) and queries q [n, g, d] (the channels that carry the most
    of q.k, so the ones whose error attention sees most)."""
    d = k.shape[1]
    energy = np.mean(np.asarray(k, dtype=np.float64) ** 2, axis=0) * np.mean(np.asarray(q, dtype=np.float64).reshape(-1, d) ** 2, axis=0)
    return OutlierSplit(outliers=np.sort(np.argsort(energy)[::-1][:n_out]), bits_hi=bits_hi, bits_lo=bits_lo)


def turboquant_mse_round_trip(x: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    """TurboQuant_mse of rows x [n, m] for any m: the norm, a Haar rotation (groups need not be a
    power of two, so no Hadamard), Lloyd-Max of the sphere coordinate law of dimension m per
    coordinate, the norm corrected as tq corrects it (d = |x| / |C[idx]|); no scale search."""
    from .codebook import lloyd_max_codebook
    from .rotation import haar_rotation

    x = np.asarray(x, dtype=np.float64)
    m = x.shape[1]
    rot = haar_rotation(m, seed)
    book = lloyd_max_codebook(bits, m)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(norm > 0, x / norm, 0.0) @ rot
    c = book.centroids[np.searchsorted(book.boundaries, u, side="left")]
    cn = np.linalg.norm(c, axis=1, keepdims=True)
    scale = np.where(cn > 0, norm.astype(np.float16).astype(np.float64) / cn, 0.0)
    return (c @ rot.T) * scale


def outlier_split_round_trip(split: OutlierSplit, k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    out = np.zeros_like(k)
    rest = np.setdiff1d(np.arange(k.shape[1]), split.outliers)
    out[:, split.outliers] = turboquant_mse_round_trip(k[:, split.outliers], split.bits_hi, seed=1)
    out[:, rest] = turboquant_mse_round_trip(k[:, rest], split.bits_lo, seed=2)
    return out


# --- measurement on real rows -------------------------------------------------------------------


def _tq_round_trip(k: np.ndarray, type_name: str) -> np.ndarray:
    from .layout import dequantize_rows, quantize_rows

    return dequantize_rows(quantize_rows(k.astype(np.float32), type_name), type_name).astype(np.float64)


def wikitext_text(n_chars: int) -> str:
    """The start of the packaged WikiText-2 test text."""
    with lzma.open(Path(__file__).resolve().parent / "data" / "wiki.test.raw.xz", "rt", encoding="utf-8") as f:
        return f.read(n_chars)


def layer_heads(model: str | Path, cal_text: str, eval_text: str, n_tokens: int = 1024):
    """Per layer and KV head of a model, (layer, head, k_cal, q_cal, k_ev, q_ev): the keys [n, d] of
    the calibration and evaluation texts centred by the calibration mean, and the queries [n, g, d]
    of the head's query heads, float64, position 0 (the attention sink, kept exactly by the cache)
    left out."""
    from .kv_dump import dump_kv
    from .models import model_path

    path = model_path(str(model))
    cal = dump_kv(path, cal_text, n_tokens=n_tokens, n_threads=2)
    ev = dump_kv(path, eval_text, n_tokens=n_tokens, n_threads=2)
    for il in range(len(cal["Kcur"])):
        kc_all, qc_all = cal["Kcur"][il][1:].astype(np.float64), cal["Qcur"][il][1:].astype(np.float64)
        ke_all, qe_all = ev["Kcur"][il][1:].astype(np.float64), ev["Qcur"][il][1:].astype(np.float64)
        hkv, g = kc_all.shape[1], qc_all.shape[1] // kc_all.shape[1]
        for h in range(hkv):
            mean = kc_all[:, h].mean(axis=0)
            yield (il, h, kc_all[:, h] - mean, qc_all[:, h * g:(h + 1) * g],
                   ke_all[:, h] - mean, qe_all[:, h * g:(h + 1) * g])


def measure(model: str | Path, cal_text: str, eval_text: str, n_tokens: int = 1024,
            codes: dict[str, float] | None = None,
            splits: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """Per layer and KV head: calibrate each calibrated code on cal_text's keys and queries (keys
    centred by cal_text's mean key), code eval_text's keys (centred by the same mean) with it and
    with tq2/tq3/tq4, and measure query_error with eval_text's own queries. Position 0 (the
    attention sink, kept exactly by the cache) is left out of means, covariances and evaluation.
    splits: name -> (n_out, bits_hi, bits_lo), the paper's outlier split calibrated on the same rows.
    Returns {"rows": [per layer-head dict], "geomean": {code: value}, "n_cal", "n_eval"}."""
    from .layout import storage_cost

    codes = codes or {"tq3c": storage_cost("tq3")[0]}
    rows = []
    for il, h, k_cal, q_cal, k_ev, q_ev in layer_heads(model, cal_text, eval_text, n_tokens):
        row: dict = {"layer": il, "head": h}
        for t in ("tq2", "tq3", "tq4"):
            row[t] = query_error(q_ev, k_ev, _tq_round_trip(k_ev, t))
        for name, bpv in codes.items():
            code = calibrate_key_code(k_cal, q_cal, bpv)
            row[name] = query_error(q_ev, k_ev, decode_keys(code, *encode_keys(code, k_ev)))
            row[name + "_bits"] = code.total_bits()
            row[name + "_cap_hits"] = int(np.sum(code.bits == MAX_BITS))
        for name, (n_out, hi, lo) in (splits or {}).items():
            split = calibrate_outlier_split(k_cal, q_cal, n_out, hi, lo)
            row[name] = query_error(q_ev, k_ev, outlier_split_round_trip(split, k_ev))
            row[name + "_bits"] = split.total_bits(k_ev.shape[1])
        rows.append(row)
    names = ["tq2", "tq3", "tq4", *codes, *(splits or {})]
    geomean = {n: float(np.exp(np.mean([np.log(r[n]) for r in rows]))) for n in names}
    return {"rows": rows, "geomean": geomean, "n_cal": len(k_cal), "n_eval": len(k_ev)}


def measure_profiles(model: str | Path, cal_text: str, eval_text: str, n_tokens: int = 1024,
                     bits_per_value: float = 3.25, profiles: dict[str, np.ndarray] | None = None) -> dict:
    """tq3c with its per layer-head allocation against the same code with one bit profile for the
    whole model (shared_profile of its calibrations) and with given profiles (another model's):
    what a type with a fixed profile would lose. Keys and queries as in measure().
    Returns {"rows", "geomean", "profile"} (profile: this model's, as a list)."""
    heads = [(il, h, calibrate_key_code(k_cal, q_cal, bits_per_value), k_ev, q_ev)
             for il, h, k_cal, q_cal, k_ev, q_ev in layer_heads(model, cal_text, eval_text, n_tokens)]
    own = shared_profile([c for _, _, c, _, _ in heads])
    variants = {"per layer-head": None, "model profile": own, **(profiles or {})}
    rows = []
    for il, h, code, k_ev, q_ev in heads:
        row: dict = {"layer": il, "head": h, "tq3": query_error(q_ev, k_ev, _tq_round_trip(k_ev, "tq3"))}
        for name, prof in variants.items():
            c = code if prof is None else with_profile(code, prof)
            row[name] = query_error(q_ev, k_ev, decode_keys(c, *encode_keys(c, k_ev)))
        rows.append(row)
    names = ["tq3", *variants]
    geomean = {n: float(np.exp(np.mean([np.log(r[n]) for r in rows]))) for n in names}
    return {"rows": rows, "geomean": geomean, "profile": own.tolist()}
