"""Parity of the C library (the patched ggml, through its own type traits) with the NumPy reference.

The quantizers follow the same float32 arithmetic in the same order (tq-blocks.h), so their bytes
must be identical; dot products and V accumulation use other summation orders (and SIMD), so they
are compared with bounds derived from float32 rounding.
"""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest

from turboquant_llama import layout
from turboquant_llama.ggml_lib import GGML_TYPE_IDS
from turboquant_llama.layout import QK_TQ, TQ_TYPES

from .conftest import require_build

EPS32 = float(np.finfo(np.float32).eps)
EPS16 = 2.0 ** -11  # unit roundoff of fp16: the _qjl types carry the query in fp16


@pytest.fixture(scope="module")
def lib():
    require_build()
    from turboquant_llama.ggml_lib import load

    return load()


def _rows(kind: str, rng: np.random.Generator, n_rows: int = 96, n: int = 256) -> np.ndarray:
    if kind == "gaussian":
        x = rng.standard_normal((n_rows, n))
    elif kind == "heavy_tailed":
        x = rng.standard_t(2.0, size=(n_rows, n))
    elif kind == "outlier_channels":
        x = rng.standard_normal((n_rows, n))
        x[:, [c % n for c in (3, 70, 131, 200)]] *= 40.0  # what real K caches look like: a few huge channels
    elif kind == "one_hot":
        x = np.zeros((n_rows, n))
        x[np.arange(n_rows), rng.integers(0, n, n_rows)] = rng.uniform(0.5, 5.0, n_rows)
    elif kind == "zeros":
        x = np.zeros((n_rows, n))
    elif kind == "tiny":
        x = rng.standard_normal((n_rows, n)) * 1e-20
    elif kind == "huge":
        x = rng.standard_normal((n_rows, n)) * 2e3  # block norms ~ 1.6e4, inside fp16's range
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


KINDS = ["gaussian", "heavy_tailed", "outlier_channels", "one_hot", "zeros", "tiny", "huge"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_quantized_bytes_identical(lib, type_name, kind):
    x = _rows(kind, np.random.default_rng(zlib.crc32(f"{type_name}/{kind}".encode())))
    c_ref = lib.quantize_rows(x, type_name)
    c_cpu = lib.quantize_rows(x, type_name, cpu=True)  # SET_ROWS / CPY path
    numpy = layout.quantize_rows(x, type_name)
    assert np.array_equal(c_ref, c_cpu)
    bs = TQ_TYPES[type_name].type_size
    differing_blocks = int(np.any((c_ref != numpy).reshape(x.shape[0], -1, bs), axis=2).sum())
    # a value exactly on a cell boundary could round differently; none has been seen, allow 1 in 10^4
    assert differing_blocks <= x.size // QK_TQ // 10_000, f"{differing_blocks} blocks differ"


@pytest.mark.parametrize(("norm_correction", "scale_search"), [(True, False), (False, True)])
@pytest.mark.parametrize("type_name", ["tq2", "tq3", "tq4"])
def test_measurement_variants_bytes_identical(lib, type_name, norm_correction, scale_search):
    """The reference's measurement variants (tq_quantize_row_with: no scale search; no norm
    correction, which also means no search) write the NumPy variants' bytes, and not the product's."""
    x = _rows("outlier_channels", np.random.default_rng(zlib.crc32(f"{type_name}/variant".encode())))
    c = lib.quantize_rows(x, type_name, norm_correction=norm_correction, scale_search=scale_search)
    numpy = layout.quantize_rows(x, type_name, norm_correction=norm_correction, scale_search=scale_search)
    assert np.array_equal(c, numpy)
    assert not np.array_equal(c, lib.quantize_rows(x, type_name))


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_dequantize_matches_numpy(lib, type_name):
    x = _rows("outlier_channels", np.random.default_rng(1))
    raw = layout.quantize_rows(x, type_name)
    c = lib.dequantize_rows(raw, type_name, x.shape[1])
    ref = layout.dequantize_rows(raw, type_name)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    # same float32 operations in the same order; allow a few ulps of the row's largest value
    assert np.all(np.abs(c - ref) <= 8 * EPS32 * scale)


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_non_finite_rows_decode_to_nan(lib, type_name):
    x = _rows("gaussian", np.random.default_rng(2), n_rows=4, n=128)
    x[0, 5] = np.nan
    x[1, 70] = np.inf
    raw = lib.quantize_rows(x, type_name, cpu=True)
    y = lib.dequantize_rows(raw, type_name, 128)
    assert np.all(np.isnan(y[0, :64])) and np.all(np.isfinite(y[0, 64:]))
    assert np.all(np.isnan(y[1, 64:])) and np.all(np.isfinite(y[1, :64]))
    assert np.all(np.isfinite(y[2:]))
    # the exact sink defers to a NaN-coded row (tq_row_is_nan), so NaN travels through it as well
    is_nan = lib.base.tq_row_is_nan
    is_nan.restype, is_nan.argtypes = ctypes.c_bool, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
    rows = np.ascontiguousarray(raw)
    assert [is_nan(GGML_TYPE_IDS[type_name], rows[r].ctypes.data, 128) for r in range(4)] == [True, True, False, False]


def _dot_bound(type_name: str, raw: np.ndarray, q: np.ndarray) -> np.ndarray:
    """|error| bound of a float32 dot product of n terms: n * eps * sum |k_j q_j|, plus the fp16
    rounding of the query (and of its projections) for the _qjl types."""
    k_rot = layout.dequantize_rows_rotated(raw, type_name).astype(np.float64)
    q_rot = layout.rotate_query_rows(q).astype(np.float64)
    mag = np.sum(np.abs(k_rot * q_rot), axis=1)
    n = q.shape[1]
    bound = 2 * n * EPS32 * mag
    if TQ_TYPES[type_name].qjl:
        s = layout.qjl_matrix_f32().astype(np.float64)
        sq = np.abs(q_rot.reshape(q.shape[0], -1, QK_TQ) @ s.T).sum(axis=(1, 2))
        norms = np.abs(k_rot).reshape(q.shape[0], -1, QK_TQ).max(axis=2).sum(axis=1)
        bound = bound + 2 * EPS16 * (mag + norms * sq)
    return bound + 1e-30


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
@pytest.mark.parametrize("kind", ["gaussian", "outlier_channels", "heavy_tailed"])
def test_vec_dot_simd_and_scalar_within_float_error(lib, type_name, kind):
    rng = np.random.default_rng(3)
    x = _rows(kind, rng)
    q = rng.standard_normal(x.shape).astype(np.float32)
    raw = layout.quantize_rows(x, type_name)
    exact = layout.vec_dot_rows(raw, q, type_name)
    bound = _dot_bound(type_name, raw, q)
    top = lib.set_simd_level(99)  # every level this processor has: scalar, AVX2/NEON, AVX-512
    try:
        for simd in range(top + 1):
            lib.set_simd_level(simd)
            got = lib.vec_dot_rows(raw, q, type_name).astype(np.float64)
            assert np.all(np.abs(got - exact) <= bound), f"simd level {simd}"
    finally:
        lib.set_simd_level(99)


def test_exact_row_joins_the_rotated_accumulator(lib):
    """The exact sink's float32 V row, rotated into the same accumulator as the TQ rows, comes out
    of the one rotation back as itself: the sum equals w0 * x0 + the weighted dequantized rows."""
    rng = np.random.default_rng(5)
    x = _rows("outlier_channels", rng, n_rows=12, n=128)
    w = rng.uniform(0.0, 1.0, x.shape[0]).astype(np.float32)
    raw = layout.quantize_rows(x[1:], "tq2")
    ref = w[0] * x[0].astype(np.float64) + (w[1:, None].astype(np.float64) * layout.dequantize_rows(raw, "tq2")).sum(axis=0)
    mag = np.abs(w[0] * x[0]).max() + (np.abs(w[1:, None]) * np.abs(layout.dequantize_rows_rotated(raw, "tq2"))).sum(axis=0).max()
    got = lib.mad_rotated(raw, "tq2", x.shape[1], w[1:], x[0], float(w[0])).astype(np.float64)
    # the forward and inverse rotations (3 x 6 butterfly stages each) plus the accumulation
    bound = (x.shape[0] + 36) * EPS32 * np.sqrt(QK_TQ) * mag + 1e-30
    assert np.all(np.abs(got - ref) <= bound)
    # the exact row is not its TQ code
    coded = lib.mad_rotated(layout.quantize_rows(x, "tq2"), "tq2", x.shape[1], w).astype(np.float64)
    assert np.abs(coded - ref).max() > 10 * bound


@pytest.mark.parametrize("type_name", sorted(TQ_TYPES))
def test_v_accumulation_in_rotated_domain(lib, type_name):
    """The flash-attention V path: decode rows in the rotated domain, accumulate with weights,
    rotate back once; equals the weighted sum of fully dequantized rows."""
    rng = np.random.default_rng(4)
    x = _rows("outlier_channels", rng, n_rows=40, n=128)
    w = rng.uniform(0.0, 1.0, x.shape[0]).astype(np.float32)
    raw = layout.quantize_rows(x, type_name)
    ref = (w[:, None].astype(np.float64) * layout.dequantize_rows(raw, type_name)).sum(axis=0)
    mag = (np.abs(w[:, None]) * np.abs(layout.dequantize_rows_rotated(raw, type_name))).sum(axis=0)
    top = lib.set_simd_level(99)
    try:
        for simd in range(top + 1):
            lib.set_simd_level(simd)
            got = lib.mad_rotated(raw, type_name, x.shape[1], w).astype(np.float64)
            # accumulation over rows plus the 3 x 6 butterfly stages of the inverse rotation
            bound = (x.shape[0] + 18) * EPS32 * np.sqrt(QK_TQ) * mag.max() + 1e-30
            assert np.all(np.abs(got - ref) <= bound), f"simd level {simd}"
    finally:
        lib.set_simd_level(99)
