"""The value-side measurement of issue 18 (pytools/value_code.py): its attention weights and its
output error, on small synthetic rows where the answers are known."""

from __future__ import annotations

import numpy as np

from turboquant_llama import value_code as vc
from turboquant_llama.key_code import _tq_round_trip, calibrate_key_code, decode_keys, encode_keys


def test_causal_softmax_is_softmax_over_the_past():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((7, 16)), rng.standard_normal((7, 16))
    p = vc.causal_softmax(q, k)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.all(p[np.triu_indices(7, 1)] == 0.0)
    t = 4
    s = q[t] @ k[:t + 1].T / 4.0
    assert np.allclose(p[t, :t + 1], np.exp(s) / np.exp(s).sum())


def test_output_errors_of_a_constant_shift_are_the_shift():
    """Weights that sum to 1 carry a constant error c unchanged to every output row: P (v + c) =
    P v + c, so the error is n |c|^2 over sum |P v|^2 (and through W, n |W c|^2 over sum |W P v|^2)."""
    rng = np.random.default_rng(1)
    n, d = 9, 8
    v = rng.standard_normal((n, d))
    c = rng.standard_normal(d)
    p = [vc.causal_softmax(rng.standard_normal((n, d)), rng.standard_normal((n, d))) for _ in range(2)]
    w = [rng.standard_normal((5, d)) for _ in range(2)]
    plain, out = vc.output_errors(p, w, v, v - c)
    assert np.isclose(plain, 2 * n * c @ c / sum(np.sum((pr @ v) ** 2) for pr in p))
    assert np.isclose(out, sum(n * np.sum((wr @ c) ** 2) for wr in w) / sum(np.sum((pr @ v @ wr.T) ** 2) for pr, wr in zip(p, w)))
    assert vc.output_errors(p, w, v, v) == (0.0, 0.0)


def test_output_weighting_spends_bits_where_the_projection_looks():
    """Values of one isotropic law seen through a projection that reads 8 of 64 directions: the
    code calibrated by the projection puts its bits there and beats tq3's isotropic code through
    the projection, which an unweighted calibrated code cannot (every direction looks alike)."""
    rng = np.random.default_rng(2)
    d, n = 64, 2048
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    w = (basis[:, :8] * 3.0).T                       # [8, d]: reads 8 directions
    v_cal, v = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    p = [np.eye(n)]
    err = {}
    for name, weight in (("out", w[:, None]), ("plain", np.eye(d)[None])):
        code = calibrate_key_code(v_cal, weight, 3.25)
        err[name] = vc.output_errors(p, [w], v, decode_keys(code, *encode_keys(code, v)))[1]
    err["tq3"] = vc.output_errors(p, [w], v, _tq_round_trip(v, "tq3"))[1]
    assert err["out"] < 0.5 * err["tq3"]
    assert err["plain"] > err["out"]
