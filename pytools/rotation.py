"""Random rotations and the fixed-seed random numbers behind them.

Everything that ends up in the C header (rotation signs, the QJL matrix) comes from splitmix64 and
pure-Python arithmetic, never from numpy's generators, whose streams may change between versions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import numpy as np

# Fixed forever: the generated header and every stored cache depend on them.
ROTATION_SEED = 0x5451_526F_7461_7465  # "TQRotate"
QJL_SEED = 0x5451_514A_4C53_6B74       # "TQQJLSkt"

_MASK64 = (1 << 64) - 1


def splitmix64(seed: int) -> Iterator[int]:
    """The splitmix64 stream (Steele, Lea, Flood 2014) started at seed: an endless uint64 generator."""
    state = seed & _MASK64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


def rotation_sign_words(dim: int, rounds: int, seed: int) -> list[list[int]]:
    """The uint64 sign words of each round: ceil(dim/64) consecutive words of one stream per round."""
    words_per_round = (dim + 63) // 64
    stream = splitmix64(seed)
    return [[next(stream) for _ in range(words_per_round)] for _ in range(rounds)]


def rotation_signs(dim: int, rounds: int, seed: int) -> np.ndarray:
    """bool [rounds, dim]: True where the randomized Hadamard round negates the element.

    Element w*64 + k of a round is bit k of that round's word w.
    """
    words = rotation_sign_words(dim, rounds, seed)
    bits = [[(ws[j // 64] >> (j % 64)) & 1 for j in range(dim)] for ws in words]
    return np.array(bits, dtype=bool).reshape(rounds, dim)


def _check_power_of_two(dim: int) -> None:
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {dim}")


def _fwht_columns_inplace(columns: np.ndarray) -> None:
    """FWHT of every column of a C-contiguous [dim, n] array, in place.

    Working on the transposed layout makes each butterfly operand a contiguous run of h*n values,
    several times faster than strided slices of [n, dim] rows.
    """
    dim, n = columns.shape
    h = 1
    while h < dim:
        pairs = columns.reshape(dim // (2 * h), 2, h * n)
        a = pairs[:, 0, :].copy()
        b = pairs[:, 1, :]
        pairs[:, 0, :] += b
        np.subtract(a, b, out=pairs[:, 1, :])
        h *= 2


def _float_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)


def _columns(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """x [..., dim] -> a fresh C-contiguous [dim, n] copy in x's float dtype, and x's shape."""
    x = np.asarray(x)
    dim = x.shape[-1]
    _check_power_of_two(dim)
    columns = np.ascontiguousarray(x.reshape(-1, dim).T, dtype=_float_dtype(x))
    if np.shares_memory(columns, x):
        columns = columns.copy()
    return columns, x.shape


def _rows_from_columns(columns: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(columns.T).reshape(shape)


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform over the last axis, in the dtype of x.

    Butterflies with h = 1, 2, 4, ...: for each pair (i, i + h) inside a block of 2h,
    (a, b) -> (a + b, a - b). Each output of a stage is one rounded add or subtract of two inputs
    of the previous stage, so for float32 this is bit-exact with the scalar C loop.
    """
    columns, shape = _columns(x)
    _fwht_columns_inplace(columns)
    return _rows_from_columns(columns, shape)


def _check_signs(signs: np.ndarray, dim: int) -> np.ndarray:
    signs = np.atleast_2d(np.asarray(signs, dtype=bool))
    if signs.shape[-1] != dim:
        raise ValueError(f"signs have length {signs.shape[-1]}, vectors {dim}")
    return signs


def rotate_randomized_hadamard(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Apply rounds of (negate by signs, FWHT, times 1/sqrt(dim)) over the last axis of x.

    signs is bool [rounds, dim] (True: negate). The scale is 1/sqrt(dim) rounded once to x's
    dtype (exactly 0.125 for dim = 64); negation and a power-of-two scale are exact.
    """
    columns, shape = _columns(x)
    dim = columns.shape[0]
    scale = columns.dtype.type(1.0 / math.sqrt(dim))
    for round_signs in _check_signs(signs, dim):
        columns[round_signs] *= -1
        _fwht_columns_inplace(columns)
        columns *= scale
    return _rows_from_columns(columns, shape)


def unrotate_randomized_hadamard(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Inverse of rotate_randomized_hadamard: rounds in reverse, each FWHT, scale, then signs."""
    columns, shape = _columns(y)
    dim = columns.shape[0]
    scale = columns.dtype.type(1.0 / math.sqrt(dim))
    for round_signs in _check_signs(signs, dim)[::-1]:
        _fwht_columns_inplace(columns)
        columns *= scale
        columns[round_signs] *= -1
    return _rows_from_columns(columns, shape)


@functools.lru_cache(maxsize=32)
def _gaussian_matrix_cached(rows: int, cols: int, seed: int) -> np.ndarray:
    count = rows * cols
    stream = splitmix64(seed)
    values = []
    two_pi = 2.0 * math.pi
    # math's libm functions rather than numpy's SIMD ones: the same doubles on every machine
    for _ in range((count + 1) // 2):
        u1 = ((next(stream) >> 11) + 1) * 2.0**-53  # (0, 1]: log stays finite
        u2 = (next(stream) >> 11) * 2.0**-53        # [0, 1)
        radius = math.sqrt(-2.0 * math.log(u1))
        angle = two_pi * u2
        values.append(radius * math.cos(angle))
        values.append(radius * math.sin(angle))
    matrix = np.array(values[:count], dtype=np.float64).reshape(rows, cols)
    matrix.setflags(write=False)
    return matrix


def gaussian_matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    """float64 [rows, cols] of independent N(0, 1), row-major, by Box-Muller from splitmix64(seed).

    Each pair of words (w1, w2) gives u1 = ((w1 >> 11) + 1) / 2^53, u2 = (w2 >> 11) / 2^53 and the
    two values r cos(2 pi u2), r sin(2 pi u2) with r = sqrt(-2 ln u1), in that order.
    """
    return _gaussian_matrix_cached(int(rows), int(cols), int(seed)).copy()


def haar_rotation(dim: int, seed: int) -> np.ndarray:
    """A uniformly (Haar) distributed orthogonal float64 [dim, dim]: QR of a Gaussian matrix.

    Multiplying Q's columns by sign(diag(R)) makes the factorisation unique, which is what makes Q
    Haar distributed rather than biased by the QR algorithm's sign convention.
    """
    q, r = np.linalg.qr(gaussian_matrix(dim, dim, seed))
    diag_signs = np.where(np.diag(r) < 0.0, -1.0, 1.0)
    return q * diag_signs[None, :]
