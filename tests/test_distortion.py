"""Monte-Carlo distortion at d = 128 against BRIEF.md section 2, plus the NumPy reference's options.

Tolerances: the BRIEF's relative bands (3% for D_mse, 5% for d * D_prod) are far wider than the
sampling error at 20000 vectors (about 0.1-0.2% and 1% relative); bias checks use the measured
standard errors directly.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from turboquant_llama import distortion
from turboquant_llama import reference as ref
from turboquant_llama.codebook import lloyd_max_codebook
from turboquant_llama.distortion import measure_distortion

DIM = 128
VECTORS = 20_000
SEED = 0
BRIEF_D_MSE = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}
BRIEF_D_PROD_TIMES_DIM = {1: 1.571, 2: 0.567, 3: 0.182, 4: 0.053}


@pytest.fixture(scope="module")
def mse_results() -> dict[int, dict]:
    return {b: measure_distortion(b, DIM, "mse", VECTORS, SEED) for b in (1, 2, 3, 4)}


@pytest.fixture(scope="module")
def prod_results() -> dict[int, dict]:
    return {b: measure_distortion(b, DIM, "prod", VECTORS, SEED) for b in (2, 3, 4)}


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_d_mse_matches_brief(bits, mse_results):
    r = mse_results[bits]
    assert abs(r["d_mse"] - BRIEF_D_MSE[bits]) < 0.03 * BRIEF_D_MSE[bits]
    # and the codebook's exact value within sampling error
    assert abs(r["d_mse"] - r["d_mse_theory"]) < 4 * r["d_mse_stderr"]
    # independent uniform queries: E<y, e>^2 = |e|^2 / d, so d * D_prod = D_mse for this variant
    assert abs(r["d_prod_times_dim"] - r["d_mse"]) < 0.05 * r["d_mse"]


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_d_prod_matches_brief(bits, prod_results):
    r = prod_results[bits]
    assert abs(r["d_prod_times_dim"] - BRIEF_D_PROD_TIMES_DIM[bits]) < 0.05 * BRIEF_D_PROD_TIMES_DIM[bits]
    assert abs(r["d_prod"] - r["d_prod_theory_times_dim"] / DIM) < 4 * r["d_prod_stderr"]
    assert abs(r["d_mse"] - r["d_mse_theory"]) < 4 * r["d_mse_stderr"]


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_prod_is_unbiased(bits, prod_results):
    r = prod_results[bits]
    for key in ("ip_bias", "ip_bias_correlated", "ip_bias_relative"):
        assert abs(r[key]) < 3 * r[key + "_stderr"], (key, r[key], r[key + "_stderr"])


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_mse_shrinks_inner_products(bits, mse_results):
    r = mse_results[bits]
    # on independent queries the bias vanishes by symmetry ...
    assert abs(r["ip_bias"]) < 3 * r["ip_bias_stderr"]
    # ... but on correlated ones E est = (1 - D_mse) <y, u>: clearly nonzero, and the predicted size
    assert r["ip_bias_relative"] < -10 * r["ip_bias_relative_stderr"]
    assert abs(r["ip_bias_relative"] - r["ip_bias_relative_theory"]) < 4 * r["ip_bias_relative_stderr"]
    assert r["ip_bias_correlated"] < -10 * r["ip_bias_correlated_stderr"]
    assert abs(r["ip_bias_correlated"] + r["d_mse_theory"] / 2) < 4 * r["ip_bias_correlated_stderr"]
    assert r["ip_bias_relative_theory"] == pytest.approx(-lloyd_max_codebook(bits, DIM).d_mse)


def test_norm_correction_halves_the_shrinkage():
    r = measure_distortion(2, DIM, "mse", 5000, 1, norm_correction=True)
    d = lloyd_max_codebook(2, DIM).d_mse
    assert abs(r["ip_bias_relative"] - (math.sqrt(1 - d) - 1)) < 4 * r["ip_bias_relative_stderr"] + 0.003


@pytest.mark.parametrize("rotation", ("hadamard1", "hadamard3", "haar"))
def test_every_rotation_reaches_the_theory_on_uniform_vectors(rotation):
    r = measure_distortion(2, 64, "mse", 4000, 2, rotation=rotation)
    assert abs(r["d_mse"] - lloyd_max_codebook(2, 64).d_mse) < 4 * r["d_mse_stderr"]


def test_one_bit_prod_is_pure_qjl():
    r = measure_distortion(1, DIM, "prod", 4000, 3)
    assert abs(r["d_prod_times_dim"] - math.pi / 2) < 0.08 * math.pi / 2


def test_distortion_command_json(capsys):
    parser = argparse.ArgumentParser()
    distortion.add_commands(parser.add_subparsers())
    args = parser.parse_args(["distortion", "--bits", "2", "--dim", "64", "--variant", "prod",
                              "--vectors", "500", "--seed", "4", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("d_mse", "d_prod", "ip_bias", "ip_bias_stderr", "ip_bias_relative"):
        assert isinstance(out[key], float)
    assert out == measure_distortion(2, 64, "prod", 500, 4)


def test_distortion_command_through_cli(capsys):
    from turboquant_llama import cli

    assert cli.main(["distortion", "--bits", "3", "--dim", "32", "--vectors", "300", "--seed", "5"]) == 0
    assert "D_mse" in capsys.readouterr().out
    assert cli.main(["distortion", "--bits", "3", "--dim", "96", "--vectors", "300"]) == 2


# --- the reference's other entry points ----------------------------------------------------------------


def test_zero_and_scaled_vectors():
    x = np.zeros((3, 64))
    x[1] = np.random.default_rng(5).standard_normal(64)
    x[2] = 1e6 * x[1]
    q = ref.quantize_mse(x, 3)
    y = ref.dequantize_mse(q)
    assert np.all(y[0] == 0)
    np.testing.assert_allclose(y[2], 1e6 * y[1], rtol=1e-12)
    p = ref.quantize_prod(x, 3)
    assert np.all(ref.dequantize_prod(p)[0] == 0) and p.residual_norms[0] == 0


def test_prod_reconstruction_is_unbiased_over_s():
    rng = np.random.default_rng(6)
    x = np.repeat(rng.standard_normal((1, 64)), 4000, axis=0)
    u = x[0] / np.linalg.norm(x[0])
    p = ref.quantize_prod(x, 2, qjl_matrix=rng.standard_normal((4000, 64, 64)))
    mean = ref.dequantize_prod(p).mean(axis=0) / np.linalg.norm(x[0])
    # each row has its own S; the mean of 4000 unbiased reconstructions approaches u
    assert np.linalg.norm(mean - u) < 5 * math.sqrt(np.mean(np.sum((ref.dequantize_prod(p) / np.linalg.norm(x[0]) - u) ** 2, 1)) / 4000)


def test_split_chooses_outliers_by_mean_magnitude():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, 128))
    outliers = np.array([5, 17, 33, 64, 90, 101, 120, 127] + list(range(40, 64)))
    x[:, outliers] *= 10.0
    chosen = ref.choose_outlier_channels(x, 32)
    assert np.array_equal(chosen, np.sort(outliers))
    q = ref.quantize_split(x, bits_outlier=3, bits_rest=2)
    assert np.array_equal(q.outlier_channels, np.sort(outliers)) and q.rest_channels.size == 96
    # (32 * 3 + 96 * 2) / 128 = 2.25 index bits; two fp16 norms per 128 values add the 0.25 to 2.5
    assert q.bits_per_value == 2.25
    assert q.outlier.rotation == "hadamard2" and q.rest.rotation == "haar"  # 96 is no power of two
    y = ref.dequantize_split(q)
    err_split = np.mean(np.sum((x - y) ** 2, 1) / np.sum(x**2, 1))
    err_2bit = np.mean(np.sum((x - ref.dequantize_mse(ref.quantize_mse(x, 2))) ** 2, 1) / np.sum(x**2, 1))
    assert err_split < 0.8 * err_2bit
    queries = rng.standard_normal((2000, 128))
    est = ref.estimate_inner_product_split(q, queries)
    np.testing.assert_allclose(est, np.sum(y * queries, 1), rtol=1e-10, atol=1e-9)
    prod = ref.quantize_split(x, outliers, 3, 2, variant="prod")
    assert prod.outlier.bits == 3 and prod.rest.mse.bits == 1
