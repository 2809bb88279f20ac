"""`tq calibrate`: the model's mean keys for key centering, a GGUF that llama.cpp reads through
--tq-key-means; a file of another model or a model that cannot be calibrated is a clear error."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from turboquant_llama.build import find_binary

from .conftest import require_build, require_llama_cpp, require_model
from .gguf_files import write_tiny_llama


@pytest.fixture(scope="module")
def smollm2_means():
    require_model("smollm2")
    require_llama_cpp()
    from turboquant_llama.calibrate import key_means

    return key_means("smollm2")


def test_key_means_file_holds_every_layer(smollm2_means):
    """One finite mean per layer, of the layer's K row width (SmolLM2: 3 heads of 64), written by
    the calibration text that ships with the project, and the same file on a second call."""
    from gguf import GGUFReader

    from turboquant_llama.calibrate import CALIBRATION_TEXT, key_means

    reader = GGUFReader(smollm2_means)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(tensors) == sorted(f"tq_key_mean.{il}" for il in range(30))
    assert all(t.shape == (192,) and np.isfinite(t).all() for t in tensors.values())
    assert float(np.abs(tensors["tq_key_mean.10"]).max()) > 0.1   # keys share a large common part
    text = reader.get_field("tq.calibration.text")
    assert bytes(text.parts[text.data[0]]).decode() == CALIBRATION_TEXT.name
    assert key_means("smollm2") == smollm2_means


def test_means_of_another_model_are_a_clear_error(smollm2_means, tmp_path):
    """llama.cpp refuses a key-means file whose layers do not fit the model, naming the file."""
    require_build()
    model = write_tiny_llama(tmp_path / "tiny.gguf", 64)
    proc = subprocess.run([str(find_binary("llama-completion")), "-m", str(model), "-p", "hi", "-n", "1", "-c", "256",
                           "-fa", "on", "-ctk", "tq3", "-ctv", "tq2", "--tq-key-means", str(smollm2_means), "-no-cnv",
                           "--no-warmup", "-t", "1"], capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode > 0, "must fail cleanly, not crash"
    assert str(smollm2_means) in proc.stderr and "another model" in proc.stderr, proc.stderr[-1500:]


def test_a_model_that_cannot_be_calibrated_is_a_clear_error(tmp_path):
    """The calibration runs in a child process: a model llama.cpp cannot run gives a UserError that
    says how to go on without centering, and the caller lives on."""
    require_llama_cpp()
    from turboquant_llama.calibrate import key_means
    from turboquant_llama.errors import UserError

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match="tq-key-center off"):
        key_means(broken)


@pytest.fixture(scope="module")
def smollm2_tq3c():
    require_model("smollm2")
    require_llama_cpp()
    from turboquant_llama.calibrate import tq3c_transforms

    return tq3c_transforms("smollm2")


def test_tq3c_file_holds_each_layers_transforms(smollm2_tq3c):
    """Per layer the key mean and, per KV head, the two transforms: queries and keys through them
    keep their dot products (attention can run on the coefficients), and the calibration chunks'
    keys through W_k have unit variance in every coefficient; the file says which caches it serves."""
    from gguf import GGUFReader

    from turboquant_llama.calibrate import TQ3C_CTX, tq3c_calibration_dumps, tq3c_transforms
    from turboquant_llama.models import model_path
    from turboquant_llama.tq3c import TQ3C_PROFILE

    reader = GGUFReader(smollm2_tq3c)
    t = {x.name: np.asarray(x.data) for x in reader.tensors}
    assert sorted(t) == sorted(f"tq3c_{kind}.{il}" for il in range(30) for kind in ("k_mean", "k_transform", "q_transform"))
    prof = reader.get_field("tq.tq3c.profile")
    assert [int(prof.parts[i][0]) for i in prof.data] == list(TQ3C_PROFILE)
    n_ctx = reader.get_field("tq.tq3c.n_ctx")
    assert int(n_ctx.parts[n_ctx.data[0]][0]) == TQ3C_CTX
    wk, wq, mean = t["tq3c_k_transform.7"], t["tq3c_q_transform.7"], t["tq3c_k_mean.7"].reshape(3, 64)
    assert wk.shape == wq.shape == (3, 64, 64)
    rng = np.random.default_rng(0)
    k, q = rng.standard_normal((16, 64)), rng.standard_normal((16, 64))
    for h in range(3):
        assert np.allclose((q @ wq[h]) @ (k @ wk[h]).T, q @ k.T, rtol=1e-3, atol=1e-3 * np.abs(q @ k.T).max())
    dumps = tq3c_calibration_dumps(model_path("smollm2"), TQ3C_CTX)
    assert len(dumps) >= 4 and all(d["n_tokens"] == 1024 for d in dumps)   # the text has 7 chunks of SmolLM2 tokens
    z = (np.concatenate([np.asarray(d["Kcur"][7], dtype=np.float64)[1:, 1] for d in dumps]) - mean[1]) @ wk[1]
    var = z.var(axis=0)
    assert np.allclose(var, 1.0, atol=0.02)
    assert tq3c_transforms("smollm2") == smollm2_tq3c


def test_tq3c_calibration_of_a_broken_model_is_a_clear_error(tmp_path):
    require_llama_cpp()
    from turboquant_llama.calibrate import tq3c_transforms
    from turboquant_llama.errors import UserError

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match="tq3c key transforms.*tq3 keys instead"):
        tq3c_transforms(broken)


def test_tq3c_calibration_positions_cover_the_cache():
    """Chunks spread evenly from position 0 to the cache's last position, none past it; a context
    llama.cpp pads (to 256 cells) still falls inside its calibration."""
    from turboquant_llama.calibrate import TQ3C_CTX, tq3c_ctx_for, tq3c_positions

    assert tq3c_positions(4096, 8) == [0, 439, 878, 1317, 1755, 2194, 2633, 3072]
    assert tq3c_positions(4096, 3) == [0, 1536, 3072]
    assert tq3c_positions(512, 16) == [0] * 8          # chunks of 512 tokens, all at 0
    assert tq3c_positions(32768, 8)[-1] == 32768 - 1024
    assert tq3c_positions(32768, 1) == [0]
    assert tq3c_ctx_for(None) == TQ3C_CTX
    assert tq3c_ctx_for(100) == 256 and tq3c_ctx_for(512) == 512
    for n in (4097, 4160, 9000, 32768):
        padded = -(-n // 256) * 256
        assert tq3c_ctx_for(n) == padded


def test_kv_dump_chunks_sit_at_their_positions():
    """A chunk decoded at position p holds what it holds at 0 up to RoPE: layer 0's V rows (no
    position in them) are the same, its K rows are turned (each RoPE pair keeps its length)."""
    require_model("smollm2")
    require_llama_cpp()
    from turboquant_llama.calibrate import calibration_text
    from turboquant_llama.kv_dump import dump_kv_chunks
    from turboquant_llama.models import model_path

    text = calibration_text()
    at0, at5000 = (dump_kv_chunks(model_path("smollm2"), text, 64, [p])[0] for p in (0, 5000))
    assert np.array_equal(at0["Vcur"][0], at5000["Vcur"][0])
    k0, k1 = (np.asarray(d["Kcur"][0], dtype=np.float64) for d in (at0, at5000))
    assert np.abs(k0 - k1).max() > 0.1 * np.abs(k0).max()
    pair_len = lambda k: np.hypot(k[..., 0::2], k[..., 1::2])   # SmolLM2: RoPE on adjacent pairs
    assert np.allclose(pair_len(k0), pair_len(k1), rtol=1e-3, atol=1e-3 * np.abs(k0).max())
    two = dump_kv_chunks(model_path("smollm2"), text, 64, [0, 5000])
    assert [d["n_tokens"] for d in two] == [64, 64]
    assert np.array_equal(two[0]["Kcur"][3], at0["Kcur"][3])


@pytest.mark.parametrize("args, expect", [(["--ctx", "8192"], "--ctx for --tq3c"),
                                          (["--tq3c", "--tokens", "2048"], "--tokens is for the mean keys"),
                                          (["--tq3c", "--ctx", "100"], "--ctx must be at least 256"),
                                          (["--tokens", "10"], "--tokens must be at least 64")])
def test_calibrate_command_refuses_mixed_options(capsys, args, expect):
    from turboquant_llama.cli import main

    assert main(["calibrate", "--model", "smollm2", *args]) == 2
    assert expect in capsys.readouterr().err
