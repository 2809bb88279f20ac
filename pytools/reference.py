"""TurboQuant (arXiv 2504.19874, section 3) in NumPy: the math, not the cache bytes.

float64 throughout, any dimension for which the chosen rotation exists (powers of two for the
Hadamard rotations, any d >= 3 for "haar"). layout.py is the byte-exact version of the cache types.

Rotations: "hadamard2" (default) is two randomized Hadamard rounds with independent signs, as the
cache types use; "hadamard1" is one round (maps a one-hot vector to a flat +-1/sqrt(d) vector, far
from the law the codebook assumes); "hadamard3" and "hadamard4" add rounds (two rounds still map a
one-hot vector onto a lattice of multiples of 2/d: the d-point Walsh spectrum of the second sign
vector); "haar" is a dense uniformly random orthogonal matrix, the paper's choice and the one the
guarantees are proven for.
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
    haar_rotation,
    rotate_randomized_hadamard,
    rotation_signs,
    splitmix64,
    unrotate_randomized_hadamard,
)

ROTATIONS = ("hadamard2", "hadamard1", "hadamard3", "hadamard4", "haar")


# --- rotations ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _hadamard_signs(dim: int, rounds: int, seed: int) -> np.ndarray:
    return rotation_signs(dim, rounds, seed)


@functools.lru_cache(maxsize=16)
def _haar(dim: int, seed: int) -> np.ndarray:
    matrix = haar_rotation(dim, seed)
    matrix.setflags(write=False)
    return matrix


def _hadamard_rounds(rotation: str) -> int:
    return int(rotation.removeprefix("hadamard"))


def _check_rotation(rotation: str, dim: int) -> None:
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    if rotation != "haar" and dim & (dim - 1):
        raise ValueError(f"{rotation} needs a power-of-two dimension, got {dim}; use rotation='haar'")


def rotate(x: np.ndarray, rotation: str, seed: int) -> np.ndarray:
    """y = P x for every row of x (float64)."""
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[-1]
    _check_rotation(rotation, dim)
    if rotation == "haar":
        return x @ _haar(dim, seed).T
    return rotate_randomized_hadamard(x, _hadamard_signs(dim, _hadamard_rounds(rotation), seed))


def unrotate(y: np.ndarray, rotation: str, seed: int) -> np.ndarray:
    """x = P^T y for every row of y (float64)."""
    y = np.asarray(y, dtype=np.float64)
    dim = y.shape[-1]
    _check_rotation(rotation, dim)
    if rotation == "haar":
        return y @ _haar(dim, seed)
    return unrotate_randomized_hadamard(y, _hadamard_signs(dim, _hadamard_rounds(rotation), seed))


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected vectors as rows [N, d], got shape {x.shape}")
    return x


# --- TurboQuant_mse (Algorithm 1) ------------------------------------------------------------------


@dataclass(frozen=True)
class MseQuantized:
    bits: int
    dim: int
    rotation: str
    seed: int
    norm_correction: bool
    norms: np.ndarray    # float64 [N]: ||x||, or ||x|| / ||c[idx]|| with norm correction
    indices: np.ndarray  # uint8 [N, dim]: Lloyd-Max cell of each rotated coordinate


def quantize_mse(
    x: np.ndarray,
    bits: int,
    *,
    rotation: str = "hadamard2",
    norm_correction: bool = False,
    seed: int = ROTATION_SEED,
) -> MseQuantized:
    """TurboQuant_mse of every row of x: norm, rotate the unit vector, nearest Lloyd-Max centroid.

    bits = 0 is allowed (every coordinate decodes to 0; the MSE part of 1-bit TurboQuant_prod).
    A value exactly on a boundary takes the lower cell, as in tq-blocks.h.
    """
    x = _rows(x)
    dim = x.shape[1]
    book = lloyd_max_codebook(bits, dim)
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0.0, norms, 1.0)
    y = rotate(x / safe[:, None], rotation, seed)
    indices = np.searchsorted(book.boundaries, y, side="left").astype(np.uint8)
    stored = norms
    if norm_correction:
        decoded_norms = np.linalg.norm(book.centroids[indices], axis=1)
        stored = norms / decoded_norms
    return MseQuantized(bits, dim, rotation, seed, norm_correction, stored, indices)


def dequantize_mse_rotated(q: MseQuantized) -> np.ndarray:
    """The decoded rows in the rotated domain: norms * c[idx]."""
    book = lloyd_max_codebook(q.bits, q.dim)
    return q.norms[:, None] * book.centroids[q.indices]


def dequantize_mse(q: MseQuantized) -> np.ndarray:
    """float64 [N, dim]: norms * P^T c[idx]."""
    return unrotate(dequantize_mse_rotated(q), q.rotation, q.seed)


def estimate_inner_product_mse(q: MseQuantized, y: np.ndarray) -> np.ndarray:
    """<y_i, x~_i> for every row i (y is [N, dim] or one [dim] query for all rows).

    Biased: over the random rotation E<y, x~> = (1 - D_mse) <y, x> without norm correction.
    """
    return np.einsum("nd,nd->n", dequantize_mse(q), np.broadcast_to(np.asarray(y, np.float64), (q.norms.size, q.dim)))


# --- TurboQuant_prod (Algorithm 2) -----------------------------------------------------------------


@dataclass(frozen=True)
class ProdQuantized:
    bits: int
    mse: MseQuantized             # (bits - 1)-bit TurboQuant_mse, plain norms
    residual_norms: np.ndarray    # float64 [N]: gamma = ||u - u~_mse|| of the unit vector u
    signs: np.ndarray             # int8 [N, m]: sign(S r), +1 where S r >= 0
    qjl_matrix: np.ndarray        # float64 [m, dim] S, or [G, m, dim]: one S per group of rows

    @property
    def dim(self) -> int:
        return self.mse.dim

    @property
    def norms(self) -> np.ndarray:
        return self.mse.norms

    @property
    def qjl_rows(self) -> int:
        return self.qjl_matrix.shape[-2]


def _apply_qjl(v: np.ndarray, qjl_matrix: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Rows of v times S^T (v [N, d] -> [N, m]) or, with transpose, times S ([N, m] -> [N, d]).

    A [G, m, d] qjl_matrix applies S_g to the g-th of G consecutive groups of ceil(N/G) rows.
    """
    if qjl_matrix.ndim == 2:
        return v @ (qjl_matrix if transpose else qjl_matrix.T)
    groups = qjl_matrix.shape[0]
    rows = v.shape[0]
    size = -(-rows // groups)
    padded = np.zeros((groups * size, v.shape[1]))
    padded[:rows] = v
    # einsum's own loops, not BLAS: many small multithreaded BLAS calls stall on a busy machine
    spec = "gnm,gmd->gnd" if transpose else "gnd,gmd->gnm"
    out = np.einsum(spec, padded.reshape(groups, size, -1), qjl_matrix, optimize=False)
    return out.reshape(groups * size, -1)[:rows]


def quantize_prod(
    x: np.ndarray,
    bits: int,
    *,
    rotation: str = "hadamard2",
    seed: int = ROTATION_SEED,
    qjl_seed: int = QJL_SEED,
    qjl_rows: int | None = None,
    qjl_matrix: np.ndarray | None = None,
) -> ProdQuantized:
    """TurboQuant_prod of every row of x: (bits-1)-bit MSE of u = x/||x||, then the 1-bit QJL
    sketch sign(S r) of the residual r = u - u~_mse and gamma = ||r||.

    S is qjl_matrix if given, else gaussian_matrix(qjl_rows or dim, dim, qjl_seed). The
    unbiasedness is over the draw of S; a [G, m, dim] qjl_matrix gives each of G consecutive
    groups of ceil(N/G) rows its own S, to average over S in measurements.
    """
    if bits < 1:
        raise ValueError(f"TurboQuant_prod needs at least 1 bit, got {bits}")
    x = _rows(x)
    dim = x.shape[1]
    if qjl_matrix is None:
        qjl_matrix = gaussian_matrix(qjl_rows or dim, dim, qjl_seed)
    qjl_matrix = np.asarray(qjl_matrix, dtype=np.float64)
    if qjl_matrix.ndim not in (2, 3) or qjl_matrix.shape[-1] != dim:
        raise ValueError(f"QJL matrix must be [m, {dim}] or [G, m, {dim}], got {qjl_matrix.shape}")
    mse = quantize_mse(x, bits - 1, rotation=rotation, norm_correction=False, seed=seed)
    safe = np.where(mse.norms > 0.0, mse.norms, 1.0)
    unit = x / safe[:, None]
    unit_decoded = unrotate(lloyd_max_codebook(bits - 1, dim).centroids[mse.indices], rotation, seed)
    residual = np.where(mse.norms[:, None] > 0.0, unit - unit_decoded, 0.0)
    gamma = np.linalg.norm(residual, axis=1)
    signs = np.where(_apply_qjl(residual, qjl_matrix) >= 0.0, 1, -1).astype(np.int8)
    return ProdQuantized(bits, mse, gamma, signs, qjl_matrix)


def _unit_mse_decode(q: ProdQuantized) -> np.ndarray:
    book = lloyd_max_codebook(q.mse.bits, q.dim)
    return unrotate(book.centroids[q.mse.indices], q.mse.rotation, q.mse.seed)


def dequantize_prod(q: ProdQuantized) -> np.ndarray:
    """float64 [N, dim]: n (u~_mse + gamma sqrt(pi/2)/m S^T sign(S r)), an unbiased reconstruction."""
    scale = q.residual_norms * math.sqrt(math.pi / 2) / q.qjl_rows
    qjl = scale[:, None] * _apply_qjl(q.signs.astype(np.float64), q.qjl_matrix, transpose=True)
    return q.norms[:, None] * (_unit_mse_decode(q) + qjl)


def estimate_inner_product_prod(q: ProdQuantized, y: np.ndarray) -> np.ndarray:
    """n (<y, u~_mse> + gamma sqrt(pi/2)/m <S y, sign(S r)>) for every row; unbiased over S."""
    y = np.broadcast_to(np.asarray(y, np.float64), (q.norms.size, q.dim))
    mse_part = np.einsum("nd,nd->n", _unit_mse_decode(q), y)
    sketch = np.einsum("nm,nm->n", _apply_qjl(y, q.qjl_matrix), q.signs.astype(np.float64))
    return q.norms * (mse_part + q.residual_norms * math.sqrt(math.pi / 2) / q.qjl_rows * sketch)


# --- outlier-channel split (section 4.3) -----------------------------------------------------------


@dataclass(frozen=True)
class SplitQuantized:
    dim: int
    outlier_channels: np.ndarray  # int64, ascending
    rest_channels: np.ndarray     # int64, ascending
    outlier: MseQuantized | ProdQuantized
    rest: MseQuantized | ProdQuantized

    @property
    def bits_per_value(self) -> float:
        """Index bits per value, stored norms not included."""
        n_out = self.outlier_channels.size
        return (n_out * self.outlier.bits + (self.dim - n_out) * self.rest.bits) / self.dim


def choose_outlier_channels(x: np.ndarray, count: int) -> np.ndarray:
    """The count channels with the largest mean |x| over the rows of x, ascending."""
    x = _rows(x)
    if not 0 < count < x.shape[1]:
        raise ValueError(f"outlier channel count must be in 1..{x.shape[1] - 1}, got {count}")
    order = np.argsort(-np.mean(np.abs(x), axis=0), kind="stable")
    return np.sort(order[:count]).astype(np.int64)


def _derived_seed(seed: int, k: int) -> int:
    stream = splitmix64(seed)
    for _ in range(k):
        next(stream)
    return next(stream)


def quantize_split(
    x: np.ndarray,
    outlier_channels: np.ndarray | None = None,
    bits_outlier: int = 3,
    bits_rest: int = 2,
    *,
    n_outliers: int | None = None,
    variant: str = "mse",
    rotation: str = "auto",
    norm_correction: bool = False,
    seed: int = ROTATION_SEED,
) -> SplitQuantized:
    """Two independent TurboQuant instances: one on the outlier channels, one on the rest.

    The paper (section 4.3) does not say how the outlier channels are chosen. When
    outlier_channels is None they are the n_outliers (default dim // 4, i.e. 32 of 128 as in the
    paper's 2.5-bit setting) channels with the largest mean |x| over the rows of x given here,
    so pass calibration rows, or pass the channels explicitly.

    rotation "auto" uses "hadamard2" for a power-of-two part and "haar" otherwise (96 channels
    has no Hadamard matrix of that form). The two instances get different seeds derived from seed.
    """
    x = _rows(x)
    dim = x.shape[1]
    if outlier_channels is None:
        outlier_channels = choose_outlier_channels(x, n_outliers or dim // 4)
    outlier_channels = np.unique(np.asarray(outlier_channels, dtype=np.int64))
    if outlier_channels.size == 0 or outlier_channels.size >= dim or outlier_channels.min() < 0 or outlier_channels.max() >= dim:
        raise ValueError("outlier channels must be a non-empty proper subset of 0..dim-1")
    rest_channels = np.setdiff1d(np.arange(dim, dtype=np.int64), outlier_channels)

    def instance(part: np.ndarray, bits: int, k: int) -> MseQuantized | ProdQuantized:
        part_dim = part.shape[1]
        part_rotation = rotation
        if rotation == "auto":
            part_rotation = "haar" if part_dim & (part_dim - 1) else "hadamard2"
        part_seed = _derived_seed(seed, k)
        if variant == "mse":
            return quantize_mse(part, bits, rotation=part_rotation, norm_correction=norm_correction, seed=part_seed)
        if variant == "prod":
            return quantize_prod(part, bits, rotation=part_rotation, seed=part_seed, qjl_seed=_derived_seed(QJL_SEED, k))
        raise ValueError(f"variant must be 'mse' or 'prod', got {variant!r}")

    return SplitQuantized(
        dim,
        outlier_channels,
        rest_channels,
        instance(x[:, outlier_channels], bits_outlier, 0),
        instance(x[:, rest_channels], bits_rest, 1),
    )


def _dequantize_any(q: MseQuantized | ProdQuantized) -> np.ndarray:
    return dequantize_prod(q) if isinstance(q, ProdQuantized) else dequantize_mse(q)


def dequantize_split(q: SplitQuantized) -> np.ndarray:
    out_part = _dequantize_any(q.outlier)
    out = np.empty((out_part.shape[0], q.dim), dtype=np.float64)
    out[:, q.outlier_channels] = out_part
    out[:, q.rest_channels] = _dequantize_any(q.rest)
    return out


def estimate_inner_product_split(q: SplitQuantized, y: np.ndarray) -> np.ndarray:
    y = np.broadcast_to(np.asarray(y, np.float64), (q.outlier.norms.size, q.dim))

    def part(sub: MseQuantized | ProdQuantized, channels: np.ndarray) -> np.ndarray:
        if isinstance(sub, ProdQuantized):
            return estimate_inner_product_prod(sub, y[:, channels])
        return estimate_inner_product_mse(sub, y[:, channels])

    return part(q.outlier, q.outlier_channels) + part(q.rest, q.rest_channels)
