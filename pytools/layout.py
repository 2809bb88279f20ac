"""The TurboQuant cache block layouts of ggml_tq/tq-blocks.h, byte for byte, in NumPy.

tq-blocks.h is normative: quantize_rows follows its float32/double arithmetic in its order, so the
bytes equal those of the C reference (quantize_row_tqN_ref) for the same input. Decoding follows
tq.c's float32 order too, but only the quantized bytes are promised to be identical.

Constants: the d = 64 Lloyd-Max codebooks rounded to float32, rotation_signs(64, ROTATION_ROUNDS, ROTATION_SEED)
and the QJL matrix gaussian_matrix(56, 64, QJL_SEED) rounded to float32; header.py writes the same
values into ggml_tq/tq-codebooks.h.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .codebook import lloyd_max_codebook
from .rotation import (
    QJL_SEED,
    ROTATION_SEED,
    gaussian_matrix,
    rotate_randomized_hadamard,
    rotation_signs,
    unrotate_randomized_hadamard,
)

QK_TQ = 64
TQ_QJL_M = 56
# tq-blocks.h TQ_SCALE_GRID: step 3's scales, 1 first so that ties keep the plain nearest centroids
TQ_SCALE_GRID = np.array([1.0, 0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2, 1.25], dtype=np.float32)
# three rounds: two leave rows dominated by one channel up to 1.4x above the theoretical MSE
# (measured on the reference, see results/rotation-rounds.md); three stay within 3% of it
ROTATION_ROUNDS = 3
QUERY_BLOCK_SIZE = 256  # sizeof(block_tq_q) == sizeof(block_tq_qjl_q)
FP16_NAN_BITS = 0x7E00  # what a non-finite block stores in d (tq.c: TQ_FP16_NAN)
# tq.c's TQ_SQRT_HALF_PI, a float literal
SQRT_HALF_PI_F32 = np.float32(1.2533141373155003)


@dataclass(frozen=True)
class TqType:
    name: str
    bits: int          # bits per value of the type's name (MSE bits, plus 1 for the QJL sign)
    mse_bits: int      # bits of the Lloyd-Max index
    qjl: bool          # True: 1-bit QJL sketch of the residual plus gamma
    block_size: int
    type_size: int     # bytes per block

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.type_size / self.block_size


TQ_TYPES: dict[str, TqType] = {
    t.name: t
    for t in (
        TqType("tq2", 2, 2, False, QK_TQ, 18),
        TqType("tq3", 3, 3, False, QK_TQ, 26),
        TqType("tq4", 4, 4, False, QK_TQ, 34),
        TqType("tq2_qjl", 2, 1, True, QK_TQ, 18),
        TqType("tq3_qjl", 3, 2, True, QK_TQ, 26),
        TqType("tq4_qjl", 4, 3, True, QK_TQ, 34),
    )
}


def tq_type(type_name: str) -> TqType:
    try:
        return TQ_TYPES[type_name]
    except KeyError:
        raise ValueError(f"unknown TurboQuant type {type_name!r}; known: {', '.join(TQ_TYPES)}") from None


def storage_cost(type_name: str) -> tuple[float, int]:
    """(bits per value, bytes per 64 values), every stored norm and scale included."""
    t = tq_type(type_name)
    return t.bits_per_value, t.type_size * (64 // t.block_size)


# --- constants shared with tq-codebooks.h -----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def codebook_f32(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, boundaries) of the d = 64 codebook, each float64 value rounded once to float32."""
    book = lloyd_max_codebook(bits, QK_TQ)
    centroids = book.centroids.astype(np.float32)
    boundaries = book.boundaries.astype(np.float32)
    centroids.setflags(write=False)
    boundaries.setflags(write=False)
    return centroids, boundaries


@functools.lru_cache(maxsize=None)
def block_rotation_signs() -> np.ndarray:
    """bool [ROTATION_ROUNDS, 64]: the sign rounds of rotate(x) in tq-blocks.h."""
    signs = rotation_signs(QK_TQ, ROTATION_ROUNDS, ROTATION_SEED)
    signs.setflags(write=False)
    return signs


@functools.lru_cache(maxsize=None)
def qjl_matrix_f32() -> np.ndarray:
    """float32 [56, 64]: S of the QJL sketch, row-major as tq_qjl_matrix."""
    s = gaussian_matrix(TQ_QJL_M, QK_TQ, QJL_SEED).astype(np.float32)
    s.setflags(write=False)
    return s


# --- bit planes ------------------------------------------------------------------------------------


def pack_2bit(idx: np.ndarray) -> np.ndarray:
    """[B, 64] values 0..3 -> qs [B, 16]: byte j % 16, bits 2*(j / 16) .. +1."""
    v = (np.asarray(idx).astype(np.uint8) & 3).reshape(-1, 4, 16)
    return (v[:, 0] | (v[:, 1] << 2) | (v[:, 2] << 4) | (v[:, 3] << 6)).astype(np.uint8)


def unpack_2bit(qs: np.ndarray) -> np.ndarray:
    qs = np.asarray(qs, dtype=np.uint8).reshape(-1, 16)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    return ((qs[:, None, :] >> shifts) & 3).reshape(-1, 64).astype(np.uint8)


def pack_1bit(bits: np.ndarray) -> np.ndarray:
    """[B, 64] values 0..1 -> qh [B, 8]: byte j % 8, bit j / 8."""
    v = (np.asarray(bits).astype(np.uint8) & 1).reshape(-1, 8, 8)  # [B, j / 8, j % 8]
    weights = (1 << np.arange(8, dtype=np.uint16))[None, :, None]
    return (v * weights).sum(axis=1).astype(np.uint8)


def unpack_1bit(qh: np.ndarray) -> np.ndarray:
    qh = np.asarray(qh, dtype=np.uint8).reshape(-1, 8)
    shifts = np.arange(8, dtype=np.uint8)[None, :, None]
    return ((qh[:, None, :] >> shifts) & 1).reshape(-1, 64).astype(np.uint8)


def pack_4bit(idx: np.ndarray) -> np.ndarray:
    """[B, 64] values 0..15 -> qs [B, 32]: byte j % 32, low nibble for j < 32, high for j >= 32."""
    v = (np.asarray(idx).astype(np.uint8) & 15).reshape(-1, 2, 32)
    return (v[:, 0] | (v[:, 1] << 4)).astype(np.uint8)


def unpack_4bit(qs: np.ndarray) -> np.ndarray:
    qs = np.asarray(qs, dtype=np.uint8).reshape(-1, 32)
    return np.concatenate((qs & 15, qs >> 4), axis=1).astype(np.uint8)


def pack_signs(bits: np.ndarray) -> np.ndarray:
    """[B, 56] values 0..1 -> signs [B, 7]: sign i in byte i / 8, bit i % 8."""
    v = (np.asarray(bits).astype(np.uint8) & 1).reshape(-1, 7, 8)
    weights = (1 << np.arange(8, dtype=np.uint16))[None, None, :]
    return (v * weights).sum(axis=2).astype(np.uint8)


def unpack_signs(signs: np.ndarray) -> np.ndarray:
    signs = np.asarray(signs, dtype=np.uint8).reshape(-1, 7)
    shifts = np.arange(8, dtype=np.uint8)[None, None, :]
    return ((signs[:, :, None] >> shifts) & 1).reshape(-1, TQ_QJL_M).astype(np.uint8)


def _field_slices(t: TqType) -> dict[str, slice]:
    """Byte ranges of the block struct's fields (no padding: every field after d is uint8)."""
    sizes = [("d", 2)]
    if t.mse_bits == 1:
        sizes.append(("qh", 8))
    elif t.mse_bits == 2:
        sizes.append(("qs", 16))
    elif t.mse_bits == 3:
        sizes += [("qs", 16), ("qh", 8)]
    else:
        sizes.append(("qs", 32))
    if t.qjl:
        sizes += [("signs", 7), ("gamma", 1)]
    slices, offset = {}, 0
    for name, size in sizes:
        slices[name] = slice(offset, offset + size)
        offset += size
    assert offset == t.type_size, t
    return slices


def _pack_indices(t: TqType, idx: np.ndarray, out: np.ndarray, fields: dict[str, slice]) -> None:
    if t.mse_bits == 1:
        out[:, fields["qh"]] = pack_1bit(idx)
    elif t.mse_bits == 2:
        out[:, fields["qs"]] = pack_2bit(idx)
    elif t.mse_bits == 3:
        out[:, fields["qs"]] = pack_2bit(idx & 3)
        out[:, fields["qh"]] = pack_1bit(idx >> 2)
    else:
        out[:, fields["qs"]] = pack_4bit(idx)


def _unpack_indices(t: TqType, blocks: np.ndarray, fields: dict[str, slice]) -> np.ndarray:
    if t.mse_bits == 1:
        return unpack_1bit(blocks[:, fields["qh"]])
    if t.mse_bits == 2:
        return unpack_2bit(blocks[:, fields["qs"]])
    if t.mse_bits == 3:
        return unpack_2bit(blocks[:, fields["qs"]]) | (unpack_1bit(blocks[:, fields["qh"]]) << 2)
    return unpack_4bit(blocks[:, fields["qs"]])


# --- helpers in the spec's arithmetic ----------------------------------------------------------------


def _sequential_sum_of_squares(v: np.ndarray) -> np.ndarray:
    """sum_j (double) v_j * v_j accumulated from j = 0 upwards, one row at a time (not pairwise)."""
    vd = v.astype(np.float64)
    s = np.zeros(vd.shape[0], dtype=np.float64)
    for j in range(vd.shape[1]):
        s += vd[:, j] * vd[:, j]
    return s


def _as_blocks(x: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, int]:
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] % QK_TQ:
        raise ValueError(f"rows must be [N, K*{QK_TQ}], got shape {x.shape}")
    return x.reshape(-1, QK_TQ), x.shape[0]


def _fp16_bits(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).astype(np.float16).view(np.uint16)


def _rotate_blocks(x: np.ndarray) -> np.ndarray:
    return rotate_randomized_hadamard(x, block_rotation_signs())


def _unrotate_blocks(y: np.ndarray) -> np.ndarray:
    return unrotate_randomized_hadamard(y, block_rotation_signs())


# --- quantize ---------------------------------------------------------------------------------------


def mse_indices(u: np.ndarray, mse_bits: int) -> np.ndarray:
    """uint8: the number of float32 boundaries B_k with u > B_k (step 3 of tq-blocks.h).

    A value exactly on a boundary takes the lower cell; NaN (only possible when the norm
    overflowed float32) compares false with every boundary and gets 0, as in C.
    """
    u = np.asarray(u, dtype=np.float32)
    _, boundaries = codebook_f32(mse_bits)
    idx = np.searchsorted(boundaries, u, side="left").astype(np.uint8)
    idx[np.isnan(u)] = 0
    return idx


def search_scale_indices(u: np.ndarray, mse_bits: int) -> np.ndarray:
    """Step 3's scale search (tq-blocks.h): for each scale of TQ_SCALE_GRID the indices of u
    against the scaled boundaries; keep the first whose centroid vector is closest in angle to u."""
    u = np.asarray(u, dtype=np.float32)
    centroids, boundaries = codebook_f32(mse_bits)
    c64 = centroids.astype(np.float64)
    u64 = u.astype(np.float64)
    best = np.full(u.shape[0], -np.inf)
    idx = np.zeros(u.shape, dtype=np.uint8)
    for s in TQ_SCALE_GRID:
        cand = np.searchsorted(s * boundaries, u, side="left").astype(np.uint8)  # float32 products
        cc = c64[cand]
        dot = np.zeros(u.shape[0])
        cs = np.zeros(u.shape[0])
        for j in range(QK_TQ):   # double, j ascending, as tq.c
            dot += u64[:, j] * cc[:, j]
            cs += cc[:, j] * cc[:, j]
        score = dot / np.sqrt(cs)
        better = score > best
        best[better] = score[better]
        idx[better] = cand[better]
    return idx


def quantize_rows(x: np.ndarray, type_name: str, norm_correction: bool = True, scale_search: bool = True) -> np.ndarray:
    """float32 [N, K*64] -> uint8 [N, K*type_size], the bytes of tq-blocks.h.

    norm_correction and scale_search apply to the MSE types only (tq.c: TQ_NORM_CORRECTION and
    TQ_SCALE_SEARCH, both on by default; the search needs norm correction); the QJL types always
    store the plain norm of the nearest centroids.
    """
    t = tq_type(type_name)
    blocks, rows = _as_blocks(x)
    fields = _field_slices(t)
    out = np.zeros((blocks.shape[0], t.type_size), dtype=np.uint8)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = _sequential_sum_of_squares(blocks)
        nonfinite = ~np.isfinite(s)
        n = np.sqrt(np.where(nonfinite, 0.0, s)).astype(np.float32)
        active = ~nonfinite & (n != 0.0)

        xa = blocks[active]
        na = n[active]
        u = _rotate_blocks(xa) / na[:, None]  # float32 division
        centroids, _ = codebook_f32(t.mse_bits)
        if not t.qjl and norm_correction and scale_search:
            idx = search_scale_indices(u, t.mse_bits)
        else:
            idx = mse_indices(u, t.mse_bits)

        packed = np.zeros((xa.shape[0], t.type_size), dtype=np.uint8)
        _pack_indices(t, idx, packed, fields)
        c = centroids[idx]
        if t.qjl:
            d = na
            r = u - c
            gamma = np.sqrt(_sequential_sum_of_squares(r)).astype(np.float32)
            g = np.rint(gamma * np.float32(256.0))
            # C casts NaN to uint8 undefined; x86 gives 0 and NaN needs an overflowed norm anyway
            g = np.where(np.isnan(g), np.float32(0.0), np.minimum(g, np.float32(255.0)))
            packed[:, fields["gamma"]] = g.astype(np.uint8)[:, None]
            s_matrix = qjl_matrix_f32()
            p = np.zeros((xa.shape[0], TQ_QJL_M), dtype=np.float32)
            for j in range(QK_TQ):  # float32, j ascending, product rounded before the add
                p += s_matrix[None, :, j] * r[:, j, None]
            packed[:, fields["signs"]] = pack_signs(p >= np.float32(0.0))
        elif norm_correction:
            cn = np.sqrt(_sequential_sum_of_squares(c))
            d = (na.astype(np.float64) / cn).astype(np.float32)
        else:
            d = na
        packed[:, fields["d"]] = _fp16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)

    out[active] = packed
    nan_bits = np.array([FP16_NAN_BITS], dtype="<u2").view(np.uint8)
    out[nonfinite, 0:2] = nan_bits
    return out.reshape(rows, -1)


# --- decode -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedBlocks:
    """The fields of a run of blocks, unpacked."""
    d: np.ndarray        # float32 [B]
    idx: np.ndarray      # uint8 [B, 64]
    signs: np.ndarray | None   # uint8 [B, 56] (1 = +1), QJL types only
    gamma: np.ndarray | None   # uint8 [B], QJL types only


def unpack_blocks(raw: np.ndarray, type_name: str) -> DecodedBlocks:
    t = tq_type(type_name)
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.shape[-1] % t.type_size:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not a whole number of {t.name} blocks")
    blocks = raw.reshape(-1, t.type_size)
    fields = _field_slices(t)
    d = np.ascontiguousarray(blocks[:, fields["d"]]).view("<u2").reshape(-1).view(np.float16)
    idx = _unpack_indices(t, blocks, fields)
    signs = gamma = None
    if t.qjl:
        signs = unpack_signs(blocks[:, fields["signs"]])
        gamma = blocks[:, fields["gamma"]].reshape(-1).copy()
    return DecodedBlocks(d.astype(np.float32), idx, signs, gamma)


def _decode_unit_f32(t: TqType, blocks: DecodedBlocks) -> np.ndarray:
    """c[idx_j] (+ the QJL reconstruction) in tq.c's float32 order, before the norm."""
    centroids, _ = codebook_f32(t.mse_bits)
    y = centroids[blocks.idx]
    if t.qjl:
        gamma = blocks.gamma.astype(np.float32) / np.float32(256.0)
        scale = gamma * SQRT_HALF_PI_F32 / np.float32(TQ_QJL_M)
        s_matrix = qjl_matrix_f32()
        acc = np.zeros_like(y)
        for i in range(TQ_QJL_M):  # float32, i ascending; S * (+-1) is exact
            acc += np.where(blocks.signs[:, i, None] != 0, s_matrix[None, i, :], -s_matrix[None, i, :])
        y = y + scale[:, None] * acc
    return y


def dequantize_rows_rotated(raw: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 [N, K*type_size] -> float32 [N, K*64] in the rotated domain (what attention uses)."""
    t = tq_type(type_name)
    raw = np.asarray(raw, dtype=np.uint8)
    rows = 1 if raw.ndim == 1 else raw.shape[0]
    blocks = unpack_blocks(raw, type_name)
    with np.errstate(invalid="ignore", over="ignore"):
        y = blocks.d[:, None] * _decode_unit_f32(t, blocks)
    return y.reshape(rows, -1)


def dequantize_rows(raw: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 [N, K*type_size] -> float32 [N, K*64]: decode rotated, then the inverse rotation."""
    y = dequantize_rows_rotated(raw, type_name)
    rows = y.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        x = _unrotate_blocks(y.reshape(-1, QK_TQ))
    return x.reshape(rows, -1)


# --- query side -------------------------------------------------------------------------------------


def rotate_query_rows(q: np.ndarray) -> np.ndarray:
    """float32 [N, K*64] -> float32 [N, K*64]: each block rotated once, what block_tq_q holds."""
    blocks, rows = _as_blocks(q)
    return _rotate_blocks(blocks).reshape(rows, -1)


def qjl_query_projections(q_rotated: np.ndarray) -> np.ndarray:
    """float32 [N, K*64] rotated query -> float32 [N, K*56]: S y per block (float32, j ascending)."""
    blocks, rows = _as_blocks(q_rotated)
    s_matrix = qjl_matrix_f32()
    p = np.zeros((blocks.shape[0], TQ_QJL_M), dtype=np.float32)
    for j in range(QK_TQ):
        p += s_matrix[None, :, j] * blocks[:, j, None]
    return p.reshape(rows, -1)


def quantize_query_rows(q: np.ndarray, qjl: bool = False) -> np.ndarray:
    """float32 [N, K*64] -> uint8 [N, K*256]: block_tq_q, or block_tq_qjl_q when qjl is True.

    block_tq_qjl_q (tq.c: quantize_row_tq_qjl_q_ref): y = fp16(rotated q) and sy = fp16(S q_rot)
    with S q_rot computed from the float32 rotated query, pad zero.
    """
    y = rotate_query_rows(q)
    rows = y.shape[0]
    yb = y.reshape(-1, QK_TQ)
    if not qjl:
        return yb.astype("<f4").view(np.uint8).reshape(rows, -1)
    sy = qjl_query_projections(yb).reshape(-1, TQ_QJL_M)
    with np.errstate(over="ignore"):
        halves = np.concatenate(
            (_fp16_bits(yb), _fp16_bits(sy), np.zeros((yb.shape[0], QK_TQ - TQ_QJL_M), np.uint16)), axis=1
        )
    return halves.astype("<u2").view(np.uint8).reshape(rows, -1)


def vec_dot_rows(raw_k: np.ndarray, q: np.ndarray, type_name: str) -> np.ndarray:
    """float64 [N]: <dequantized K row, q> computed exactly (float64) in the rotated domain.

    Per block d * <C[idx] + (g/256) sqrt(pi/2)/56 * S^T s, q_rot> in float64, summed over the
    blocks, with the float32 rotated query of block_tq_q: the value the C vec_dot approximates
    (and, like it, +-inf rather than NaN for a block whose fp16 norm overflowed). q is [N, K*64]
    or one row [K*64] used for every K row.
    """
    t = tq_type(type_name)
    raw_k = np.asarray(raw_k, dtype=np.uint8)
    if raw_k.ndim == 1:
        raw_k = raw_k[None, :]
    rows = raw_k.shape[0]
    blocks = unpack_blocks(raw_k, type_name)
    q = np.asarray(q, dtype=np.float32)
    if q.ndim == 1:
        q = np.broadcast_to(q, (rows, q.shape[0]))
    if q.shape != (rows, blocks.idx.shape[0] // rows * QK_TQ):
        raise ValueError(f"query shape {q.shape} does not match {rows} K rows of {t.name}")
    q_rot = rotate_query_rows(q).astype(np.float64).reshape(-1, QK_TQ)
    centroids, _ = codebook_f32(t.mse_bits)
    unit_dot = np.einsum("bj,bj->b", centroids.astype(np.float64)[blocks.idx], q_rot)
    if t.qjl:
        sketch_q = q_rot @ qjl_matrix_f32().astype(np.float64).T  # S y, [B, 56]
        sign_values = np.where(blocks.signs != 0, 1.0, -1.0)
        scale = blocks.gamma.astype(np.float64) / 256.0 * math.sqrt(math.pi / 2.0) / TQ_QJL_M
        unit_dot = unit_dot + scale * np.einsum("bi,bi->b", sign_values, sketch_q)
    with np.errstate(invalid="ignore", over="ignore"):
        per_block = blocks.d.astype(np.float64) * unit_dot
    return per_block.reshape(rows, -1).sum(axis=1)
