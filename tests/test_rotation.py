"""Rotations: splitmix64, sign words, the FWHT's float32 behaviour, Hadamard and Haar rotations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from turboquant_llama.rotation import (
    QJL_SEED,
    ROTATION_SEED,
    fwht,
    gaussian_matrix,
    haar_rotation,
    rotate_randomized_hadamard,
    rotation_sign_words,
    rotation_signs,
    splitmix64,
    unrotate_randomized_hadamard,
)

DIMS = (2, 8, 64, 128, 256)


def test_splitmix64_reference_values():
    # the published outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c)
    stream = splitmix64(0)
    assert [next(stream) for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    stream = splitmix64(ROTATION_SEED)
    values = [next(stream) for _ in range(1000)]
    assert all(0 <= v < 2**64 for v in values) and len(set(values)) == 1000


def test_seeds_are_fixed_64_bit_values():
    assert ROTATION_SEED == 0x5451526F74617465 and QJL_SEED == 0x5451514A4C536B74


@pytest.mark.parametrize("dim", (64, 128, 256, 32))
def test_rotation_signs_come_from_one_stream(dim):
    rounds = 3
    signs = rotation_signs(dim, rounds, ROTATION_SEED)
    assert signs.shape == (rounds, dim) and signs.dtype == bool
    stream = splitmix64(ROTATION_SEED)
    per_round = (dim + 63) // 64
    for r in range(rounds):
        words = [next(stream) for _ in range(per_round)]
        assert rotation_sign_words(dim, rounds, ROTATION_SEED)[r] == words
        expected = [bool((words[j // 64] >> (j % 64)) & 1) for j in range(dim)]
        assert signs[r].tolist() == expected


def _fwht_scalar_float32(x: np.ndarray) -> np.ndarray:
    """Literal transcription of the C loop in tq-blocks.h, one float32 operation at a time."""
    y = [np.float32(v) for v in x]
    n = len(y)
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a, b = y[j], y[j + h]
                y[j] = np.float32(a + b)
                y[j + h] = np.float32(a - b)
        h *= 2
    return np.array(y, dtype=np.float32)


def test_fwht_float32_bit_exact_with_scalar_loop():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 64)) * np.exp(rng.uniform(-20, 20, (6, 1)))).astype(np.float32)
    got = fwht(x)
    assert got.dtype == np.float32
    for row, expected in zip(got, map(_fwht_scalar_float32, x)):
        assert np.array_equal(row.view(np.uint32), expected.view(np.uint32))
    # deterministic and independent of the batch it is computed in
    assert np.array_equal(fwht(x[3]), got[3])
    assert np.array_equal(fwht(x), got)


@pytest.mark.parametrize("dim", DIMS)
def test_fwht_is_hadamard(dim):
    h = fwht(np.eye(dim))
    np.testing.assert_array_equal(np.abs(h), 1.0)
    np.testing.assert_allclose(h @ h.T, dim * np.eye(dim), atol=1e-12)
    x = np.random.default_rng(1).standard_normal((3, dim))
    np.testing.assert_allclose(fwht(fwht(x)), dim * x, atol=1e-10)


def test_fwht_rejects_other_lengths():
    with pytest.raises(ValueError):
        fwht(np.zeros(96))


@pytest.mark.parametrize("rounds", (1, 2))
@pytest.mark.parametrize("dim", DIMS)
def test_randomized_hadamard_is_orthogonal_and_inverted(dim, rounds):
    signs = rotation_signs(dim, rounds, ROTATION_SEED)
    p = rotate_randomized_hadamard(np.eye(dim), signs)  # row i = P e_i, i.e. P^T
    np.testing.assert_allclose(p @ p.T, np.eye(dim), atol=1e-12)
    x = np.random.default_rng(2).standard_normal((5, dim))
    y = rotate_randomized_hadamard(x, signs)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(unrotate_randomized_hadamard(y, signs), x, atol=1e-12)
    np.testing.assert_allclose(y, x @ p, atol=1e-12)


def test_float32_rotation_keeps_dtype_and_scale_is_exact_at_64():
    signs = rotation_signs(64, 2, ROTATION_SEED)
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    y = rotate_randomized_hadamard(x, signs)
    assert y.dtype == np.float32
    # one round by hand: negate, FWHT, times 0.125f (exact), in float32
    first = _fwht_scalar_float32(np.where(signs[0], -x[0], x[0])) * np.float32(0.125)
    second = _fwht_scalar_float32(np.where(signs[1], -first, first)) * np.float32(0.125)
    assert np.array_equal(second.view(np.uint32), y[0].view(np.uint32))
    back = unrotate_randomized_hadamard(y, signs)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dim", (64, 128))
def test_one_hot_rows_after_one_and_two_rounds(dim):
    """BRIEF section 3: one round maps a one-hot row to a flat +-1/sqrt(d) row; two do not."""
    one_hot = np.eye(dim)[[0, 5, dim - 1]]
    flat = rotate_randomized_hadamard(one_hot, rotation_signs(dim, 1, ROTATION_SEED))
    np.testing.assert_allclose(np.abs(flat), 1.0 / math.sqrt(dim), rtol=1e-15)
    spread = rotate_randomized_hadamard(one_hot, rotation_signs(dim, 2, ROTATION_SEED))
    for row in spread:
        assert np.unique(np.round(np.abs(row), 12)).size > 2
        # the fourth moment of a uniform unit vector's coordinates is about 3/d^2; a flat row has 1/d^2
        assert np.mean(row**4) * dim * dim > 1.5


def test_one_hot_float32_one_round_is_exactly_an_eighth():
    one_hot = np.eye(64, dtype=np.float32)
    flat = rotate_randomized_hadamard(one_hot, rotation_signs(64, 1, ROTATION_SEED))
    assert np.all(np.abs(flat) == np.float32(0.125))


def test_gaussian_matrix_is_deterministic_and_standard_normal():
    a = gaussian_matrix(56, 64, QJL_SEED)
    assert a.shape == (56, 64) and a.dtype == np.float64
    assert np.array_equal(a, gaussian_matrix(56, 64, QJL_SEED))
    a[0, 0] = 99.0  # callers get a copy: the cache stays intact
    assert gaussian_matrix(56, 64, QJL_SEED)[0, 0] != 99.0
    # a prefix of the same stream: row-major, two values per pair of words
    assert np.array_equal(gaussian_matrix(1, 10, 7)[0], gaussian_matrix(2, 10, 7).reshape(-1)[:10])
    big = gaussian_matrix(200, 500, 12345).reshape(-1)
    assert abs(big.mean()) < 5 / math.sqrt(big.size)
    assert abs(big.var() - 1.0) < 5 * math.sqrt(2 / big.size)
    assert abs(np.mean(big**4) - 3.0) < 0.1
    assert not np.array_equal(gaussian_matrix(4, 4, 1), gaussian_matrix(4, 4, 2))


@pytest.mark.parametrize("dim", (3, 64, 96))
def test_haar_rotation(dim):
    q = haar_rotation(dim, 11)
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-12)
    assert np.array_equal(q, haar_rotation(dim, 11))
    assert not np.allclose(q, haar_rotation(dim, 12))


def test_haar_rotation_is_uniform():
    # a coordinate of Q e_1 over many seeds has mean 0 and variance 1/d
    dim = 8
    first_columns = np.array([haar_rotation(dim, seed)[:, 0] for seed in range(400)])
    assert abs(first_columns.mean()) < 5 * math.sqrt(1 / dim / first_columns.size)
    assert abs(first_columns.var() - 1 / dim) < 0.02
    assert abs(np.mean(first_columns[:, 0])) < 5 / math.sqrt(dim * 400)
