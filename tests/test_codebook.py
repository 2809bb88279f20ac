"""Lloyd-Max codebooks against BRIEF.md section 2 and against independent numerical integration."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from scipy import integrate

from turboquant_llama import codebook
from turboquant_llama.codebook import lloyd_max_codebook, sphere_coordinate_pdf

# BRIEF.md section 2, d = 128: positive centroids times sqrt(d), and D_mse, both to 4 decimals
BRIEF_CENTROIDS_128 = {
    2: [0.4525, 1.5052],
    3: [0.2444, 0.7533, 1.3366, 2.1315],
    4: [0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889],
}
BRIEF_D_MSE_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}
# a value printed to 4 decimals is within 5e-5 of the truth
FOUR_DECIMALS = 5e-5 + 1e-12

DIMS = (3, 5, 32, 64, 128, 256)
BITS = (1, 2, 3, 4)


@pytest.mark.parametrize("bits", sorted(BRIEF_CENTROIDS_128))
def test_centroids_match_brief_at_128(bits):
    book = lloyd_max_codebook(bits, 128)
    positive = book.centroids[len(book.centroids) // 2:] * math.sqrt(128)
    np.testing.assert_allclose(positive, BRIEF_CENTROIDS_128[bits], rtol=0, atol=FOUR_DECIMALS)


@pytest.mark.parametrize("bits", BITS)
def test_d_mse_matches_brief_at_128(bits):
    assert abs(lloyd_max_codebook(bits, 128).d_mse - BRIEF_D_MSE_128[bits]) <= FOUR_DECIMALS


def test_large_dimension_approaches_gaussian_lloyd_max():
    # BRIEF: for N(0, 1) the per-coordinate Lloyd-Max MSE is 0.3634, 0.1175, 0.0345, 0.0095
    for bits, gaussian in zip(BITS, (0.3634, 0.1175, 0.0345, 0.0095)):
        assert abs(lloyd_max_codebook(bits, 8192).d_mse - gaussian) < 2e-4


@pytest.mark.parametrize("bits", BITS)
def test_dimension_three_is_uniform(bits):
    # for d = 3 a coordinate is uniform on [-1, 1]: the optimal quantizer is uniform, MSE 4^-b
    book = lloyd_max_codebook(bits, 3)
    levels = 1 << bits
    np.testing.assert_allclose(book.centroids, (2 * np.arange(levels) + 1) / levels - 1, atol=1e-12)
    assert book.d_mse == pytest.approx(4.0**-bits, abs=1e-12)


def test_pdf_is_a_density():
    for dim in DIMS:
        total, _ = integrate.quad(sphere_coordinate_pdf, -1, 1, args=(dim,), epsabs=1e-13, limit=200)
        assert total == pytest.approx(1.0, abs=1e-10)
        second, _ = integrate.quad(lambda x: x * x * sphere_coordinate_pdf(x, dim), -1, 1, epsabs=1e-14, limit=200)
        assert second == pytest.approx(1.0 / dim, rel=1e-9)
    assert sphere_coordinate_pdf(1.5, 64) == 0.0
    # log-gamma keeps huge dimensions finite
    assert math.isfinite(float(sphere_coordinate_pdf(0.0, 100_000)))


def _cell_integral(f, lo, hi, dim):
    value, _ = integrate.quad(lambda x: f(x) * sphere_coordinate_pdf(x, dim), lo, hi,
                              epsabs=0, epsrel=1e-13, limit=200)
    return value


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_centroids_are_conditional_means(bits, dim):
    book = lloyd_max_codebook(bits, dim)
    edges = np.concatenate(([-1.0], book.boundaries, [1.0]))
    squared_error = 0.0
    for i, c in enumerate(book.centroids):
        lo, hi = edges[i], edges[i + 1]
        prob = _cell_integral(lambda x: 1.0, lo, hi, dim)
        mean = _cell_integral(lambda x: x, lo, hi, dim) / prob
        assert abs(mean - c) < 1e-9, (i, mean, c)
        squared_error += _cell_integral(lambda x: (x - c) ** 2, lo, hi, dim)
    assert dim * squared_error == pytest.approx(book.d_mse, abs=1e-9)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_structure(bits, dim):
    book = lloyd_max_codebook(bits, dim)
    levels = 1 << bits
    assert book.bits == bits and book.dim == dim
    assert book.centroids.shape == (levels,) and book.boundaries.shape == (levels - 1,)
    assert np.all(np.diff(book.centroids) > 0)
    np.testing.assert_array_equal(book.centroids, -book.centroids[::-1])
    np.testing.assert_array_equal(book.boundaries, 0.5 * (book.centroids[:-1] + book.centroids[1:]))
    assert 0.0 < book.d_mse < 1.0
    if bits > 1:
        assert book.d_mse < lloyd_max_codebook(bits - 1, dim).d_mse


def test_cached_and_read_only():
    assert lloyd_max_codebook(3, 64) is lloyd_max_codebook(3, 64)
    with pytest.raises(ValueError):
        lloyd_max_codebook(3, 64).centroids[0] = 0.0


def _expected_json(bits, dim):
    book = lloyd_max_codebook(bits, dim)
    return {
        "bits": bits,
        "dim": dim,
        "centroids": book.centroids.tolist(),
        "boundaries": book.boundaries.tolist(),
        "d_mse": book.d_mse,
    }


def test_codebook_command_json_through_module_parser(capsys):
    parser = argparse.ArgumentParser()
    codebook.add_commands(parser.add_subparsers())
    args = parser.parse_args(["codebook", "--bits", "3", "--dim", "128", "--json"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == _expected_json(3, 128)
    assert list(json.loads(out)) == ["bits", "dim", "centroids", "boundaries", "d_mse"]


def _cli_main():
    from turboquant_llama import cli

    return cli.main


def test_codebook_command_json(capsys):
    main = _cli_main()
    assert main(["codebook", "--bits", "2", "--dim", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _expected_json(2, 64)


def test_codebook_command_table_and_errors(capsys):
    main = _cli_main()
    assert main(["codebook", "--bits", "2", "--dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "0.116" in out and "1.50519" in out
    assert main(["codebook", "--bits", "0", "--dim", "128"]) == 2
    assert "error" in capsys.readouterr().err
