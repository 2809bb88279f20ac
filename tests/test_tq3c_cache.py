"""tq3c keys in the patched llama.cpp, as a user runs them: `-ctk tq3c` with the model's
`tq calibrate --tq3c` file (the graph stores z = (k - m) W_k and attends with q W_q); the CPU
kernels against the reference; clear errors for what cannot work."""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest

from turboquant_llama import tq3c
from turboquant_llama.build import find_binary

from .conftest import llama_completion, require_build, require_model

PROMPT = "The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2():
    require_build()
    return require_model("smollm2")


@pytest.fixture(scope="module")
def smollm2_tq3c(smollm2):
    from turboquant_llama.calibrate import tq3c_transforms

    return tq3c_transforms("smollm2")


def _rows(rng: np.random.Generator, n_rows: int, n: int) -> np.ndarray:
    z = rng.standard_normal((n_rows, n)) * 10.0 ** rng.integers(-3, 4, (n_rows, 1))
    z[3, 5] = np.nan   # a NaN row decodes to NaN gains
    z[4] = 0.0
    return z.astype(np.float32)


def test_cpu_kernels_follow_the_reference():
    """The CPU decode (tq_cpu_decode_rows_tq3c, what attention's tiles use) gives the reference's
    floats bit for bit; ggml's vec_dot of tq3c (against the float32 query: vec_dot_type F32) is the
    dot product of those floats within float32 summation error, n * 2^-24 * sum |z_j q_j|."""
    require_build()
    from turboquant_llama.ggml_lib import load

    lib = load()
    rng = np.random.default_rng(3)
    n, n_rows = 128, 40
    z = _rows(rng, n_rows, n)
    raw = tq3c.quantize_blocks(z).reshape(n_rows, -1)
    want = tq3c.dequantize_blocks(raw).reshape(n_rows, n)
    got = np.full((n_rows, n), 7.0, dtype=np.float32)
    lib.cpu.tq_cpu_decode_rows_tq3c.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.cpu.tq_cpu_decode_rows_tq3c(n, raw.ctypes.data, raw.shape[1], n_rows, got.ctypes.data)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(lib.dequantize_rows(raw, "tq3c", n).view(np.uint32), want.view(np.uint32))

    q = rng.standard_normal((n_rows, n)).astype(np.float32)
    dots = lib.vec_dot_rows(raw, q, "tq3c")
    exact = np.sum(want.astype(np.float64) * q, axis=1)
    bound = n * 2.0**-24 * np.sum(np.abs(want.astype(np.float64) * q), axis=1)
    finite = np.isfinite(exact)
    assert not finite[3] and np.isnan(dots[3])
    assert np.all(np.abs(dots[finite] - exact[finite]) <= bound[finite])


def test_generation_with_tq3c_keys(smollm2, smollm2_tq3c):
    """-ctk tq3c -ctv tq3 with the calibration file answers, and the K cache takes 26 bytes per
    64 values (3.25 bits), q8_0 in the protected first and last layers."""
    from turboquant_llama.generate import run_completion

    text, mem = run_completion("smollm2", PROMPT, "tq3c", "tq3", 12, 1024, 2, 1, [])
    assert "Berlin" in text
    assert (mem.k_type, mem.v_type) == ("tq3c", "tq3")
    assert mem.k_mib == pytest.approx((28 * 1024 * 3 * 26 + 2 * 1024 * 6 * 34) / 2**20, abs=0.01)


def test_tq3c_keys_attend_through_their_transforms(smollm2, tmp_path):
    """The graph pairs each layer's key transform with its query transform: the model's next-token
    distribution with tq3c keys stays within 1.5x the KL divergence (to f16, over WikiText-2) of
    centred tq3 keys with the same values. A wrong pairing (a transposed W, a head's W_q on another
    head's keys, a query left untransformed) breaks attention and raises it by orders of magnitude.
    The calibration is the one for this context (as the tq commands choose it): one for 4096 positions
    has 1.5x tq3's KLD here (results/tq3c-cache.md, "A calibration specialises to its positions")."""
    from turboquant_llama.calibrate import key_means, tq3c_transforms
    from turboquant_llama.corpus import wikitext2_test_path
    from turboquant_llama.perplexity import parse_kld_output

    exe = str(find_binary("llama-perplexity"))
    base = tmp_path / "base.kld"
    common = ["-m", str(smollm2), "-f", str(wikitext2_test_path()), "-c", "512", "--chunks", "6", "-fa", "on", "-t", "2",
              "-b", "512"]
    run = subprocess.run([exe, *common, "--kl-divergence-base", str(base)], capture_output=True, text=True, errors="replace",
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    kld = {}
    for k, calibration in (("tq3", key_means("smollm2")), ("tq3c", tq3c_transforms("smollm2", 512))):
        run = subprocess.run([exe, *common, "-ctk", k, "-ctv", "tq3", "--tq-key-means", str(calibration),
                              "--kl-divergence-base", str(base), "--kl-divergence"],
                             capture_output=True, text=True, errors="replace", timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        kld[k] = parse_kld_output(run.stdout + run.stderr)["kld"]
    assert 0 < kld["tq3c"] < 1.5 * kld["tq3"], kld


def test_tq3c_cannot_shift_and_says_so(smollm2, smollm2_tq3c):
    """A full context with context shift on: RoPE does not act on calibrated coefficients, so
    llama.cpp turns shifting off with a warning and stops at the end of the context (no abort)."""
    proc = llama_completion(["-m", str(smollm2), "-p", PROMPT, "-n", "400", "-c", "256", "-fa", "on", "-ctk", "tq3c", "-ctv", "tq3",
                        "--tq-key-means", str(smollm2_tq3c), "--ignore-eos", "--context-shift"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shifting is not supported" in proc.stderr


@pytest.mark.parametrize("case", ["no file", "key means file", "as V", "other model", "past the calibration"])
def test_tq3c_errors_are_clear(smollm2, smollm2_tq3c, tmp_path, case):
    """Context creation fails with a message that says what to do, never a crash or a cache that
    silently attends with untransformed keys."""
    from turboquant_llama.calibrate import key_means

    from .gguf_files import write_tiny_llama

    model, ctk, ctv, extra, ctx = smollm2, "tq3c", "tq3", [], "256"
    if case == "key means file":
        extra = ["--tq-key-means", str(key_means("smollm2"))]
        expect = "not a tq3c calibration"
    elif case == "as V":
        ctk, ctv, extra = "tq3", "tq3c", ["--tq-key-means", str(smollm2_tq3c)]
        expect = "tq3c is a key type"
    elif case == "other model":
        model = write_tiny_llama(tmp_path / "tiny.gguf", 64)
        extra = ["--tq-key-means", str(smollm2_tq3c)]
        expect = "another model"
    elif case == "past the calibration":   # caches of up to 4096 positions calibrated (TQ3C_CTX)
        extra, ctx = ["--tq-key-means", str(smollm2_tq3c)], "8192"
        expect = "calibrated for caches of up to 4096 positions"
    else:
        expect = "tq calibrate --tq3c"
    proc = llama_completion(["-m", str(model), "-p", "hi", "-n", "1", "-c", ctx, "-fa", "on", "-ctk", ctk, "-ctv", ctv, *extra])
    assert proc.returncode > 0, "must fail cleanly, not crash"
    assert expect in proc.stderr, proc.stderr[-1500:]


def test_tq3c_is_a_key_type_in_type_lists():
    from turboquant_llama.cache_types import bits_per_value, parse_type_specs
    from turboquant_llama.errors import UserError

    assert parse_type_specs("tq3c/tq3,tq3c/tq2") == [("tq3c", "tq3"), ("tq3c", "tq2")]
    assert bits_per_value("tq3c") == 3.25
    with pytest.raises(UserError, match="key type"):
        parse_type_specs("tq3c")
