"""NumPy reference of the outlier-split key types tq2o and tq3o (tq-blocks.h): the paper's 2.5- and
3.5-bit settings (issue 18 item 3) as cache types.

The paper splits a head's channels into outliers and the rest and runs TurboQuant_mse on each group
at its own bits. Here the channel choice and each group's random rotation live in a per layer and
KV head orthogonal transform W (the model's `tq calibrate --split` file), which the graph applies as
it applies tq3c's (z = (k - m) W, q W): a quarter of the channels, those with the most E[k^2] E[q^2]
over the calibration text, land on positions 0..15 of each 64-value block, the rest on 16..63, each
group turned by a fixed Haar rotation. A block then codes each group as TurboQuant_mse does: its
norm, the Lloyd-Max codebook of a coordinate of a uniform point on the sphere of the group's
dimension (16 or 48), the norm corrected to the reconstruction's.

This module writes the bytes that the C reference (tq.c) writes: the same float32 and double
operations in the same order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

QK_SPLIT = 64
N_HI = 16                   # the outlier group: a quarter of each block
ROTATION_SEEDS = (1, 2)     # haar_rotation seeds of the outlier group and of the rest


@dataclass(frozen=True)
class SplitType:
    name: str
    bits_hi: int            # bits of each of the 16 outlier positions
    bits_lo: int            # bits of each of the 48 others

    @property
    def index_bytes(self) -> int:
        return (N_HI * self.bits_hi + (QK_SPLIT - N_HI) * self.bits_lo) // 8

    @property
    def block_bytes(self) -> int:
        return 4 + self.index_bytes          # two fp16 norms, then the index bits

    def bits(self, j: int) -> int:
        return self.bits_hi if j < N_HI else self.bits_lo

    def offset(self, j: int) -> int:
        return j * self.bits_hi if j < N_HI else N_HI * self.bits_hi + (j - N_HI) * self.bits_lo


SPLIT_TYPES = {t.name: t for t in (SplitType("tq2o", 4, 2), SplitType("tq3o", 5, 3))}
GROUPS = ((0, N_HI), (N_HI, QK_SPLIT))     # positions [a, b) of each group; group g's norm is d[g]


def split_type(name: str) -> SplitType:
    return SPLIT_TYPES[name]


@functools.lru_cache(maxsize=None)
def sphere_codebook_f32(bits: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, boundaries) of the b-bit Lloyd-Max quantizer of a coordinate of a uniform point on
    the sphere in R^dim, each rounded once from double to float32: the tables of tq-codebooks.h."""
    from .codebook import lloyd_max_codebook

    book = lloyd_max_codebook(bits, dim)
    return book.centroids.astype(np.float32), book.boundaries.astype(np.float32)


def _group_books(t: SplitType) -> list[tuple[np.ndarray, np.ndarray]]:
    return [sphere_codebook_f32(t.bits_hi, N_HI), sphere_codebook_f32(t.bits_lo, QK_SPLIT - N_HI)]


def quantize_blocks(z: np.ndarray, type_name: str) -> np.ndarray:
    """float32 coefficients [n, 64] -> uint8 blocks [n, block_bytes] (tq-blocks.h, tq2o/tq3o)."""
    t = split_type(type_name)
    z = np.ascontiguousarray(z, dtype=np.float32).reshape(-1, QK_SPLIT)
    n = z.shape[0]
    out = np.zeros((n, t.block_bytes), dtype=np.uint8)
    stream = np.zeros((n, 8 * t.index_bytes), dtype=np.uint8)   # one bit per byte, LSB first
    zd = z.astype(np.float64)
    for g, ((a, b), (centroids, bounds)) in enumerate(zip(GROUPS, _group_books(t))):
        s = np.zeros(n, dtype=np.float64)
        for j in range(a, b):                                    # the reference's order
            s = s + zd[:, j] * zd[:, j]
        finite = np.isfinite(s)
        norm = np.sqrt(np.where(finite, s, 0.0)).astype(np.float32)
        live = finite & (norm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(live[:, None], z[:, a:b] / np.where(live, norm, np.float32(1.0))[:, None],
                         np.float32(0.0)).astype(np.float32)
        idx = np.where(live[:, None], np.sum(u[:, :, None] > bounds[None, None, :], axis=2), 0).astype(np.int64)
        c = np.zeros(n, dtype=np.float64)
        for j in range(b - a):
            cj = centroids[idx[:, j]].astype(np.float64)
            c = c + cj * cj
        with np.errstate(over="ignore"):    # a norm beyond fp16's range is an Inf norm, as in C
            d16 = (norm / np.sqrt(c).astype(np.float32)).astype(np.float32).astype(np.float16)
        bits16 = np.where(live, d16.view(np.uint16), np.where(finite, 0, 0x7E00)).astype(np.uint16)
        out[:, 2 * g] = (bits16 & 0xFF).astype(np.uint8)
        out[:, 2 * g + 1] = (bits16 >> 8).astype(np.uint8)
        for j in range(a, b):
            for i in range(t.bits(j)):
                stream[:, t.offset(j) + i] = (idx[:, j - a] >> i) & 1
    out[:, 4:] = np.packbits(stream.reshape(n, -1, 8), axis=2, bitorder="little").reshape(n, -1)
    return out


def dequantize_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 blocks [n, block_bytes] -> float32 coefficients [n, 64]: each group's norm times its
    centroids (a NaN norm gives NaN over its group)."""
    t = split_type(type_name)
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, t.block_bytes)
    n = blocks.shape[0]
    norms = blocks[:, :4].copy().view(np.float16).reshape(n, 2).astype(np.float32)
    stream = np.unpackbits(blocks[:, 4:], axis=1, bitorder="little").astype(np.int64)
    z = np.zeros((n, QK_SPLIT), dtype=np.float32)
    for g, ((a, b), (centroids, _)) in enumerate(zip(GROUPS, _group_books(t))):
        for j in range(a, b):
            idx = np.zeros(n, dtype=np.int64)
            for i in range(t.bits(j)):
                idx |= stream[:, t.offset(j) + i] << i
            z[:, j] = norms[:, g] * centroids[idx]
    return z


# --- the per layer and KV head transform (what the calibration file holds) ------------------------

def outlier_channels(k: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The channels of one KV head by descending E[k_j^2] E[q_j^2] over the calibration keys k [n, d]
    (centred by the caller) and queries q [n, g, d]: the ones that carry most of q.k, so the ones
    whose error attention sees most (key_code.calibrate_outlier_split's rule)."""
    d = k.shape[1]
    energy = np.mean(np.asarray(k, dtype=np.float64) ** 2, axis=0) * \
        np.mean(np.asarray(q, dtype=np.float64).reshape(-1, d) ** 2, axis=0)
    return np.argsort(-energy, kind="stable")


def split_transform(order: np.ndarray) -> np.ndarray:
    """The orthogonal W [d, d] (float64) of one KV head, channels ranked by outlier_channels: block b
    of a row takes the outliers (the first d/4 ranks) b, b + nb, ... on its positions 0..15 and the
    other ranks likewise on 16..63, each group turned by its fixed Haar rotation, so that z = k W
    is what a tq2o/tq3o block codes and (q W) . (k W) = q . k."""
    from .rotation import haar_rotation

    d = order.size
    if d % QK_SPLIT != 0:
        raise ValueError(f"head size {d} is not a multiple of {QK_SPLIT}")
    nb = d // QK_SPLIT
    hi, lo = order[:d // 4], order[d // 4:]
    rot_hi, rot_lo = haar_rotation(N_HI, ROTATION_SEEDS[0]), haar_rotation(QK_SPLIT - N_HI, ROTATION_SEEDS[1])
    w = np.zeros((d, d))
    for b in range(nb):
        cols = slice(b * QK_SPLIT, b * QK_SPLIT + N_HI)
        w[hi[b::nb], cols] = rot_hi
        w[lo[b::nb], b * QK_SPLIT + N_HI:(b + 1) * QK_SPLIT] = rot_lo
    return w
