"""Fake-quantized keys end to end (pytools/fake_keys.py): the eval callback writes a code's keys into
the f16 K cache, and the KL divergence against an f16 cache sees exactly them."""

import numpy as np
import pytest

from tests.conftest import require_llama_cpp, require_model
from turboquant_llama import fake_keys
from turboquant_llama.errors import UserError


@pytest.fixture(scope="module")
def smollm2():
    require_llama_cpp(cuda=False)
    return require_model("smollm2")


def _with_rounder(monkeypatch, fn):
    monkeypatch.setattr(fake_keys, "_fake_rounders", lambda model, codes, n_cal, center=True: {"fake-tq3": fn})


def test_keys_given_back_unchanged_change_nothing(smollm2, monkeypatch):
    seen = []

    def identity(il, rows):
        seen.append((il, rows.shape))
        return rows
    _with_rounder(monkeypatch, identity)
    rows = fake_keys.measure(smollm2, ["f16", "fake-tq3"], "f16", n_ctx=128, n_chunks=1, threads=2, center=False)
    assert [(r.keys, r.kld, r.top1) for r in rows] == [("f16", 0.0, 1.0), ("fake-tq3", 0.0, 1.0)]
    # every layer's K rows (tokens, KV heads, head size) went through the code once
    assert sorted({il for il, _ in seen}) == list(range(30)) and {s for _, s in seen} == {(128, 3, 64)}


def test_the_code_reaches_the_cache(smollm2, monkeypatch):
    _with_rounder(monkeypatch, lambda il, rows: np.zeros_like(rows))   # uniform attention everywhere
    (row,) = fake_keys.measure(smollm2, ["fake-tq3"], "f16", n_ctx=128, n_chunks=1, threads=2, center=False)
    assert row.kld > 0.1 and row.top1 < 0.9


def test_outlier_splits_are_calibrated_per_layer_and_head_and_more_bits_err_less(smollm2):
    rounders = fake_keys._fake_rounders(smollm2, ["outlier-2.5", "outlier-3.5"], n_cal=96)
    from turboquant_llama.kv_dump import dump_kv
    from turboquant_llama.key_code import wikitext_text

    k = dump_kv(smollm2, wikitext_text(2000), n_tokens=64, n_threads=2)["Kcur"][5]
    err = {c: float(np.mean((rounders[c](5, k) - k) ** 2) / np.mean(k ** 2)) for c in rounders}
    assert rounders["outlier-2.5"](5, k).shape == k.shape
    assert 0 < err["outlier-3.5"] < err["outlier-2.5"] < 0.2


def test_unknown_codes_are_refused():
    with pytest.raises(UserError, match="unknown key code outlier-9"):
        fake_keys.measure("smollm2", ["outlier-9"])


def test_a_failing_code_is_an_error_not_unchanged_keys(smollm2, monkeypatch):
    def broken(il, rows):
        raise ValueError("no such layer")
    _with_rounder(monkeypatch, broken)
    with pytest.raises(UserError, match="eval callback: ValueError: no such layer"):
        fake_keys.measure(smollm2, ["fake-tq3"], "f16", n_ctx=128, n_chunks=1, threads=2, center=False)
