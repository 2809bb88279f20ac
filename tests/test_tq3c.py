"""tq3c blocks (tq-blocks.h): the NumPy reference (pytools/tq3c.py) and the C reference (tq.c,
quantize_row_tq3c_ref / dequantize_row_tq3c in the patched ggml-base) write the same bytes and
decode the same floats: one arithmetic, in one order, in both."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from turboquant_llama import tq3c
from turboquant_llama.key_code import gaussian_lloyd_max

from .conftest import require_build


@pytest.fixture(scope="module")
def base():
    require_build()
    from turboquant_llama.ggml_lib import load

    lib = load().base
    lib.quantize_row_tq3c_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.dequantize_row_tq3c.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def _c_quantize(base, z: np.ndarray) -> np.ndarray:
    z = np.ascontiguousarray(z, dtype=np.float32)
    out = np.full((z.size // 64, tq3c.BLOCK_BYTES), 0xAB, dtype=np.uint8)
    base.quantize_row_tq3c_ref(z.ctypes.data, out.ctypes.data, z.size)
    return out


def _c_dequantize(base, blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.full(blocks.shape[0] * 64, np.nan, dtype=np.float32)
    base.dequantize_row_tq3c(blocks.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, 64)


def _coefficients(rng: np.random.Generator) -> np.ndarray:
    """Blocks of 12 kinds: unit-variance normals at scales 1e-6..1e6, heavy tails, one loud
    coefficient, zeros, a NaN, an Inf, float32 denormals, constants, values on the codebook's
    boundaries times a power of two, halves of zeros."""
    rows = []
    for scale in 10.0 ** np.arange(-6, 7):
        rows.append(rng.standard_normal((8, 64)) * scale)
    rows.append(rng.standard_t(2.0, (16, 64)))
    loud = rng.standard_normal((8, 64))
    loud[:, 5] *= 1000.0
    rows.append(loud)
    rows.append(np.zeros((2, 64)))
    nan, inf = rng.standard_normal((2, 64)), rng.standard_normal((2, 64))
    nan[:, 7], inf[:, 9] = np.nan, np.inf
    rows += [nan, inf, rng.standard_normal((4, 64)) * 1e-40, np.full((2, 64), 0.5)]
    on_edges = np.zeros((4, 64))
    for j, bits in enumerate(tq3c.TQ3C_PROFILE):
        if bits:
            b = tq3c.gauss_codebook_f32(bits)[1]
            on_edges[:, j] = b[rng.integers(0, len(b), 4)]
    rows.append(on_edges)
    half = rng.standard_normal((4, 64))
    half[:, ::2] = 0.0
    rows.append(half)
    return np.concatenate(rows).astype(np.float32)


def test_profile_fills_tq3s_bytes():
    assert sum(tq3c.TQ3C_PROFILE) == 8 * 24 and len(tq3c.TQ3C_PROFILE) == 64
    assert list(tq3c.TQ3C_PROFILE) == sorted(tq3c.TQ3C_PROFILE, reverse=True)


def test_c_and_numpy_write_the_same_bytes(base):
    z = _coefficients(np.random.default_rng(0))
    ref = tq3c.quantize_blocks(z)
    got = _c_quantize(base, z)
    assert np.array_equal(got, ref), f"{int(np.sum(np.any(got != ref, axis=1)))} of {len(z)} blocks differ"
    # the special blocks are what the layout says: NaN gain, zeros
    nan_rows = np.where(np.isnan(z).any(axis=1))[0]
    assert all(ref[r, 0] == 0x00 and ref[r, 1] == 0x7E and not ref[r, 2:].any() for r in nan_rows)
    zero_rows = np.where(~z.any(axis=1))[0]
    assert zero_rows.size and not ref[zero_rows].any()
    # step 5 took both ways here: blocks kept as tq3c and blocks stored as tq3 (sign bit of the norm)
    as_tq3 = (ref[:, 1] & 0x80) != 0
    assert 0 < as_tq3.sum() < len(z) // 4


def test_blocks_that_tq3_codes_better_are_tq3_blocks():
    """Step 5 by its definition: a block is stored as tq3 (and decodes as tq3 does) exactly where
    tq3's decoded values are closer to z by the weights 4^bits; otherwise it keeps its tq3c code."""
    from turboquant_llama.layout import dequantize_rows, quantize_rows

    rng = np.random.default_rng(5)
    z = rng.standard_normal((400, 64)).astype(np.float32) * np.float32(0.5) ** (np.arange(64) / 16)
    z[:40, 50:] *= 40.0                               # keys the profile did not expect
    blocks = tq3c.quantize_blocks(z)
    as_tq3 = (blocks[:, 1] & 0x80) != 0
    assert 0 < as_tq3.sum() < len(z)
    z3 = dequantize_rows(quantize_rows(z, "tq3"), "tq3")
    np.testing.assert_array_equal(tq3c.dequantize_blocks(blocks)[as_tq3], z3[as_tq3])
    zc = tq3c.dequantize_blocks(blocks)
    w = 4.0 ** np.asarray(tq3c.TQ3C_PROFILE)
    e3 = np.sum(w * (z3 - z).astype(np.float64) ** 2, axis=1)
    ec = np.sum(w * (zc - z).astype(np.float64) ** 2, axis=1)
    assert np.all(ec[~as_tq3] <= e3[~as_tq3] * (1 + 1e-12))


def test_c_and_numpy_decode_the_same_floats(base):
    z = _coefficients(np.random.default_rng(1))
    blocks = tq3c.quantize_blocks(z)
    blocks = np.concatenate([blocks, np.random.default_rng(2).integers(0, 256, (64, tq3c.BLOCK_BYTES), dtype=np.uint8)])
    blocks[-64:, 1] &= 0x3B   # random index bits under finite gains
    ref, got = tq3c.dequantize_blocks(blocks), _c_dequantize(base, blocks)
    assert np.array_equal(np.isnan(ref), np.isnan(got))
    assert np.array_equal(np.nan_to_num(ref), np.nan_to_num(got))


def test_round_trip_error_is_the_profiles_distortion():
    """Unit-variance normal coefficients: each position's error is its codebook's Lloyd-Max
    distortion D(b) (D(0) = 1), so the mean squared error is mean_j D(b_j); the per-block gain (the
    block's rms, not 1) moves it by a few percent; 20,000 blocks: sampling error < 1%."""
    z = np.random.default_rng(3).standard_normal((20000, 64)).astype(np.float32)
    err = np.mean((tq3c.dequantize_blocks(tq3c.quantize_blocks(z)) - z) ** 2)
    expected = np.mean([gaussian_lloyd_max(b)[2] for b in tq3c.TQ3C_PROFILE])
    assert 0.95 * expected < err < 1.10 * expected
