"""`tq eval quality`: type specs, bits per value, the llama-perplexity output parser (on output
captured from this build), results files, and one short end-to-end run."""

from __future__ import annotations

import json

import pytest

from turboquant_llama import evaluate as ev
from turboquant_llama import kv_memory, perplexity, quality_results, switches
from turboquant_llama.cache_types import bits_per_value, parse_type_specs
from turboquant_llama.errors import UserError
from turboquant_llama.kv_shape import kv_shape, read_gguf_metadata

from .gguf_files import write_metadata_gguf

# Captured from the patched build (CPU, 2 threads):
#   llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -c 512 --chunks 2 -fa on -t 2 \
#       -ctk tq3 -ctv tq2 --kl-divergence-base base.kld --kl-divergence
KLD_OUTPUT = """\
0.05.207.624 I system_info: n_threads = 2 (n_threads_batch = 2) / 2 | CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |
0.05.260.834 I kl_divergence: computing over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4
0.32.548.265 I kl_divergence: 27.29 seconds per pass - ETA 0.22 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      20.1132 ±    3.8845       0.46794 ±    0.07601       0.44062 ±    0.04740    21.075 ±  1.859 %    71.373 ±  2.836 %
   2      37.2642 ±    5.4286       0.56258 ±    0.06666       0.52378 ±    0.04027    21.879 ±  1.345 %    66.275 ±  2.096 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  37.264232 ±   5.428579
Mean PPL(base)                :  21.230838 ±   3.106659
Cor(ln(PPL(Q)), ln(PPL(base))):  89.58%
Mean ln(PPL(Q)/PPL(base))     :   0.562579 ±   0.066659
Mean PPL(Q)/PPL(base)         :   1.755194 ±   0.117000
Mean PPL(Q)-PPL(base)         :  16.033394 ±   2.984359

====== KL divergence statistics ======
Mean    KLD:   0.523781 ±   0.040268
Maximum KLD:   9.269712
99.9%   KLD:   8.220356
99.0%   KLD:   5.186872
95.0%   KLD:   1.697591
90.0%   KLD:   1.202784
Median  KLD:   0.268455
10.0%   KLD:   0.045669
 5.0%   KLD:   0.015516
 1.0%   KLD:   0.002193
 0.1%   KLD:   0.000869
Minimum KLD:   0.000539

====== Token probability statistics ======
Mean    Δp: -10.020 ± 0.862 %
Maximum Δp: 26.664%
99.9%   Δp: 26.196%
99.0%   Δp: 19.170%
95.0%   Δp:  4.727%
90.0%   Δp:  0.626%
75.0%   Δp:  0.000%
Median  Δp: -1.759%
25.0%   Δp: -13.469%
10.0%   Δp: -34.639%
 5.0%   Δp: -58.409%
 1.0%   Δp: -80.850%
 0.1%   Δp: -96.553%
Minimum Δp: -98.719%
RMS Δp    : 21.879 ± 1.345 %
Same top p: 66.275 ± 2.096 %

llama_perf_context_print:        load time =     290.17 ms
"""

# The f16 base run (same model; `-f wiki.test.raw -ctk f16 -ctv f16 --kl-divergence-base base.kld`)
BASE_OUTPUT = """\
0.04.452.096 I perplexity: calculating perplexity over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4
0.28.940.053 I perplexity: 24.43 seconds per pass - ETA 0.20 minutes
[1]12.5967,[2]21.3334,
0.29.555.112 I Final estimate: PPL = 21.3334 +/- 3.14125
"""


# --- type specs ---------------------------------------------------------------------------------------


def test_parse_type_specs_symmetric_and_asymmetric():
    assert parse_type_specs("f16,q8_0,tq3/tq2, TQ4_QJL / tq3") == [
        ("f16", "f16"), ("q8_0", "q8_0"), ("tq3", "tq2"), ("tq4_qjl", "tq3")]


def test_parse_type_specs_drops_duplicates_and_empty_items():
    assert parse_type_specs("tq3,tq3/tq3,,f16/f16,f16") == [("tq3", "tq3"), ("f16", "f16")]


@pytest.mark.parametrize("spec", ["tq5", "q4_0/tq9", "f32"])
def test_parse_type_specs_unknown_name_lists_valid_ones(spec):
    with pytest.raises(UserError) as exc:
        parse_type_specs(spec)
    msg = str(exc.value)
    assert "unknown cache type" in msg
    for name in ("f16", "q8_0", "iq4_nl", "tq2", "tq4_qjl"):
        assert name in msg


@pytest.mark.parametrize("spec", ["", " , ", "tq3/tq2/tq2", "tq3/"])
def test_parse_type_specs_malformed(spec):
    with pytest.raises(UserError):
        parse_type_specs(spec)


# --- sizes -----------------------------------------------------------------------------------------------


def test_bits_per_value():
    expected = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q5_0": 5.5, "q5_1": 6, "q4_0": 4.5, "q4_1": 5,
                "iq4_nl": 4.5, "tq2": 2.25, "tq3": 3.25, "tq4": 4.25, "tq2_qjl": 2.25, "tq3_qjl": 3.25,
                "tq4_qjl": 4.25, "tq3c": 3.25, "tq2o": 3.0, "tq3o": 4.0}
    assert set(expected) == set(ev.VALID_TYPES)
    for name, bpv in expected.items():
        assert bits_per_value(name) == pytest.approx(bpv), name
    assert ev.pair_bpv("tq3", "tq2") == pytest.approx(2.75)
    assert ev.pair_bpv("q8_0", "tq3") == pytest.approx(5.875)


def test_kv_shape_and_bytes_per_token():
    # SmolLM2-135M: 30 layers, 3 KV heads, no key_length key: 576 / 9 = 64
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
            "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}
    shape = kv_shape(meta)
    assert shape.n_layer == 30 and shape.head_sizes() == ({64}, {64})
    assert kv_memory.bytes_per_token(shape, "f16", "f16") == 30 * 3 * 64 * 2 * 2
    # tq3 block: 26 bytes per 64 values, tq2: 18, q8_0: 34 per 32
    assert kv_memory.bytes_per_token(shape, "tq3", "tq2", protect=0) == 30 * 3 * (26 + 18)
    # by default the first and the last layer of a TQ cache are q8_0
    assert kv_memory.bytes_per_token(shape, "tq3", "tq2", protect=1) == 28 * 3 * (26 + 18) + 2 * 3 * 2 * 68
    assert kv_memory.bytes_per_token(shape, "q8_0", "q8_0") == 30 * 3 * 2 * 68
    # explicit key/value lengths and per-layer KV head counts win
    meta2 = {"general.architecture": "qwen2", "qwen2.block_count": 2, "qwen2.embedding_length": 1536,
             "qwen2.attention.head_count": 12, "qwen2.attention.head_count_kv": [2, 4],
             "qwen2.attention.key_length": 128, "qwen2.attention.value_length": 128}
    shape2 = kv_shape(meta2)
    assert [layer.n_head_kv for layer in shape2.layers] == [2, 4]
    assert kv_memory.bytes_per_token(shape2, "f16", "f16") == 6 * 128 * 2 * 2


def test_gguf_header_reader(tmp_path):
    path = write_metadata_gguf(tmp_path / "tiny.gguf", "llama", 4, 256, 4, 2, token_list=["a", "bb", "ccc"] * 100,
                               more=lambda w: w.add_array("test.numbers", [1, 2, 3]))
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["test.numbers"] == [1, 2, 3]
    assert "tokenizer.ggml.tokens" not in meta          # the vocabulary is not metadata we need
    shape = kv_shape(meta)
    assert shape.n_layer == 4 and [layer.n_head_kv for layer in shape.layers] == [2, 2, 2, 2]
    assert shape.head_sizes() == ({64}, {64})
    # the same path written again is read again (the reader's cache keys on size and mtime)
    import os
    import time

    write_metadata_gguf(path, "qwen2", 2, 256, 2, 2)
    later = time.time() + 5
    os.utime(path, (later, later))
    assert read_gguf_metadata(path)["general.architecture"] == "qwen2"
    with pytest.raises(UserError):
        read_gguf_metadata(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(UserError):
        read_gguf_metadata(tmp_path / "bad.gguf")


# --- switches ----------------------------------------------------------------------------------------------


def _variant(k: str, v: str, env: dict, **options) -> str:
    setting = switches.from_env({n: t for n, t in env.items() if t is not None})
    setting.update(options)
    return switches.variant(k, v, setting)


def test_variant_of():
    off = {"TQ_NORM_CORRECTION": "0", "LLAMA_ATTN_ROT_DISABLE": None}
    assert _variant("tq3", "tq2", off) == "norm_correction=off"
    assert _variant("q8_0", "q8_0", off) == ""  # the switch cannot change this pair
    assert _variant("tq3", "tq3", {"TQ_NORM_CORRECTION": "1"}) == ""  # the default
    assert _variant("q4_0", "q4_0", {"LLAMA_ATTN_ROT_DISABLE": "1"}) == "attn_rot=off"
    assert _variant("tq3", "tq3", {"LLAMA_ATTN_ROT_DISABLE": "1"}) == ""
    assert _variant("f16", "f16", {"LLAMA_ATTN_ROT_DISABLE": "1", "TQ_NORM_CORRECTION": "0"}) == ""
    assert _variant("tq3", "tq2", {"TQ_SCALE_SEARCH": "0"}) == "scale_search=off"
    assert _variant("tq3_qjl", "q8_0", {"TQ_SCALE_SEARCH": "0"}) == ""  # the QJL types do not search
    # key centering acts on TQ keys only
    assert _variant("tq3", "tq2", {}, key_center=False) == "key_center=off"
    assert _variant("q8_0", "tq2", {}, key_center=False) == ""
    assert _variant("tq3", "tq2", {}, key_center=True) == ""
    assert _variant("tq4", "tq4", {"TQ_SCALE_SEARCH": "0"}, key_center=False) == "scale_search=off,key_center=off"
    # the exact sink acts on layers with a TQ K or V
    assert _variant("q8_0", "tq2", {}, exact_sink=False) == "exact_sink=off"
    assert _variant("q8_0", "q4_0", {}, exact_sink=False) == ""
    assert _variant("tq3", "tq2", {}, key_center=False, exact_sink=False) == "key_center=off,exact_sink=off"
    assert _variant("tq3", "tq2", {}, protect_layers=2) == "protect_layers=2"
    assert _variant("tq3", "tq2", {}, protect_layers=0) == "protect_layers=0"
    assert _variant("tq3", "tq2", {}, protect_layers=1) == ""  # the default
    assert _variant("q4_0", "q4_0", {}, protect_layers=2) == ""


def test_protected_layers_sizes():
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
            "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}
    shape = kv_shape(meta)
    types = kv_memory.layer_cache_types(shape, "tq3", "tq2", 2)
    assert types[:2] == types[-2:] == [("q8_0", "q8_0")] * 2 and types[2:28] == [("tq3", "tq2")] * 26
    assert kv_memory.layer_cache_types(shape, "q8_0", "tq2", 1)[0] == ("q8_0", "q8_0")
    assert kv_memory.layer_cache_types(shape, "f16", "tq2", 1)[-1] == ("f16", "q8_0")
    assert ev.pair_sizes(shape, "tq3", "tq2", {**switches.defaults(), "protect_layers": 0}) == (pytest.approx(2.75), 30 * 3 * (26 + 18))
    assert ev.pair_sizes(shape, "tq3", "tq2", switches.from_env({})) == (pytest.approx((28 * 2.75 + 2 * 8.5) / 30),
                                                      28 * 3 * (26 + 18) + 2 * 3 * 2 * 68)
    bpv, per_token = ev.pair_sizes(shape, "tq3", "tq2", {**switches.defaults(), "protect_layers": 2})
    assert per_token == 26 * 3 * (26 + 18) + 4 * 3 * 2 * 68
    assert bpv == pytest.approx((26 * 2.75 + 4 * 8.5) / 30)
    assert ev.pair_sizes(shape, "q8_0", "q4_0", {**switches.defaults(), "protect_layers": 2}) == (pytest.approx(6.5), 30 * 3 * (68 + 36))


def test_options_are_not_read_from_the_environment(monkeypatch):
    """The TQ cache options are per-context options (flags, keyword arguments), never environment
    variables: the old variables change nothing."""
    for env in ("TQ_KEY_CENTER", "TQ_EXACT_SINK", "TQ_PROTECT_LAYERS"):
        monkeypatch.setenv(env, "0")
    assert {n: switches.from_env()[n] for n in ("key_center", "exact_sink", "protect_layers")} == \
        {"key_center": True, "exact_sink": True, "protect_layers": kv_memory.DEFAULT_PROTECT_LAYERS}


def test_protected_layers_count_every_layer():
    # layers without a KV cache keep their index: protection counts all layers, as llama.cpp does
    meta = {"general.architecture": "llama", "llama.block_count": 4, "llama.embedding_length": 256,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": [0, 2, 2, 2]}
    shape = kv_shape(meta)
    assert [l.il for l in shape.layers] == [1, 2, 3]
    assert kv_memory.layer_cache_types(shape, "tq3", "tq3", 1) == [("tq3", "tq3"), ("tq3", "tq3"), ("q8_0", "q8_0")]


def test_env_switches_are_read(monkeypatch):
    monkeypatch.setenv("TQ_NORM_CORRECTION", "0")
    monkeypatch.delenv("TQ_ATTN_ROWS", raising=False)
    assert switches.env_texts()["TQ_NORM_CORRECTION"] == "0"
    assert switches.env_texts()["TQ_ATTN_ROWS"] is None
    assert switches.from_env()["norm_correction"] is False


# --- output parser -------------------------------------------------------------------------------------------


def test_parse_kld_output_real_snippet():
    r = perplexity.parse_kld_output(KLD_OUTPUT)
    assert r["ppl"] == pytest.approx(37.264232)
    assert r["ppl_stderr"] == pytest.approx(5.428579)
    assert r["ppl_base"] == pytest.approx(21.230838)
    assert r["ppl_ratio"] == pytest.approx(1.755194)
    assert r["kld"] == pytest.approx(0.523781)
    assert r["kld_stderr"] == pytest.approx(0.040268)
    assert r["kld_p99"] == pytest.approx(5.186872)
    assert r["kld_max"] == pytest.approx(9.269712)
    assert r["top1"] == pytest.approx(66.275)
    assert r["top1_stderr"] == pytest.approx(2.096)
    assert r["rms_dp"] == pytest.approx(21.879)


def test_parse_kld_output_missing_summary():
    truncated = KLD_OUTPUT.split("====== Perplexity statistics")[0]
    with pytest.raises(ValueError):
        perplexity.parse_kld_output(truncated)


def test_parse_kld_output_nan_becomes_none():
    text = KLD_OUTPUT.replace("Mean    KLD:   0.523781", "Mean    KLD:        nan")
    assert perplexity.parse_kld_output(text)["kld"] is None


def test_parse_base_output():
    assert perplexity.parse_base_output(BASE_OUTPUT) == {"ppl": pytest.approx(21.3334), "ppl_stderr": pytest.approx(3.14125)}
    with pytest.raises(ValueError):
        perplexity.parse_base_output("[1]12.5967,")


def test_failure_messages():
    # the patched llama-context.cpp's message for a head size the TQ block does not divide
    head = ("llama_init_from_model: TurboQuant cache types (tq2, tq3, tq4, tq*_qjl) need a head size that is a "
            "multiple of 64; for head size 80 use f16, q8_0, q5_0, q5_1, q4_0, q4_1 or iq4_nl for K\n"
            "common_init_from_params: failed to create context with model 'x.gguf'\n")
    msg = perplexity.failure_message(head, 1, "tq3 on x", None)
    assert "unsupported head size" in msg and "head size 80" in msg
    crash = "line a\nline b\nGGML_ASSERT(x) failed\n"
    msg = perplexity.failure_message(crash, -6, "tq3 on x", None)
    assert "crashed (SIGABRT)" in msg and "GGML_ASSERT(x) failed" in msg
    assert "exit 1" in perplexity.failure_message("oops\n", 1, "w", None)
    assert "without a result" in perplexity.failure_message("oops\n", 0, "w", None)


# --- results files -------------------------------------------------------------------------------------------


def _row(k, v, kld, variant="", chunks=2):
    return {"k": k, "v": v, "variant": variant, "bpv": ev.pair_bpv(k, v), "ppl": 20.0, "ppl_change_pct": 1.0,
            "kld": kld, "top1": 90.0, "kv_bytes_per_token": 100, "chunks": chunks, "ctx": 512,
            "tq_command": f"tq eval quality --model m --types {k}/{v}"}


def test_merge_rows_by_pair_and_variant():
    old = [_row("f16", "f16", 0.0), _row("tq3", "tq3", 0.1), _row("tq3", "tq3", 0.2, "norm_correction=off")]
    new = [_row("tq3", "tq3", 0.05, chunks=20), _row("q4_0", "q4_0", 0.04)]
    merged = quality_results.merge_rows(old, new)
    assert [(r["k"], r["v"], r["variant"]) for r in merged] == [
        ("f16", "f16", ""), ("tq3", "tq3", ""), ("tq3", "tq3", "norm_correction=off"), ("q4_0", "q4_0", "")]
    assert merged[1]["kld"] == 0.05 and merged[1]["chunks"] == 20


def test_write_results_accumulates(tmp_path):
    meta = {"date": "d1", "tq_command": "tq eval quality", "llama_cpp_commit": "c" * 40}
    info = {"file": "m.gguf", "n_layer": 1, "n_head_kv": 1, "key_length": 64, "value_length": 64}
    quality_results.write_results(tmp_path, "m", [_row("f16", "f16", 0.0), _row("q4_0", "q4_0", 0.04)], meta, info)
    quality_results.write_results(tmp_path, "m", [_row("tq3", "tq2", 0.3), _row("q4_0", "q4_0", 0.05)], dict(meta, date="d2"), info)
    data = json.loads((tmp_path / "quality-m.json").read_text())
    assert [(r["k"], r["v"], r["kld"]) for r in data["results"]] == [
        ("f16", "f16", 0.0), ("q4_0", "q4_0", 0.05), ("tq3", "tq2", 0.3)]
    assert [r["date"] for r in data["runs"]] == ["d1", "d2"]
    md = (tmp_path / "quality-m.md").read_text()
    assert "| tq3 | tq2 | default | 2.75 |" in md and "tq eval quality --model m" in md
    assert (tmp_path / "quality-m.png").stat().st_size > 1000


# --- end to end ----------------------------------------------------------------------------------------------


def test_eval_quality_end_to_end(tmp_path, capsys, monkeypatch):
    from tests.conftest import require_binary, require_model

    require_binary("llama-perplexity")
    require_model("smollm2")
    monkeypatch.delenv("TQ_CORPUS", raising=False)   # the packaged WikiText-2 test text
    from turboquant_llama.cli import main

    rc = main(["eval", "quality", "--model", "smollm2", "--types", "f16,tq3/tq2", "--chunks", "2", "--threads", "2",
               "--json", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["k"], r["v"]) for r in rows] == [("f16", "f16"), ("tq3", "tq2")]
    for r in rows:
        for key in ("k", "v", "bpv", "ppl", "kld", "top1", "kv_bytes_per_token"):
            assert r[key] is not None, key
    f16, tq = rows
    assert f16["kld"] == 0 and f16["top1"] == 100 and f16["bpv"] == 16 and f16["kv_bytes_per_token"] == 23040
    # the first and last layers are q8_0 (--tq-protect-layers, default 1)
    assert tq["bpv"] == pytest.approx((28 * 2.75 + 2 * 8.5) / 30)
    assert tq["kv_bytes_per_token"] == 28 * 3 * (26 + 18) + 2 * 3 * 2 * 68
    assert tq["kld"] > 0 and tq["top1"] < 100 and tq["ppl"] > 1
    assert tq["env"] == {name: None for name in switches.ENV_NAMES}
    assert tq["switches"]["protect_layers"] == 1 and tq["switches"]["key_center"] == "on"
    assert tq["corpus"] == "wiki.test.raw"
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"quality-smollm2.{ext}").exists()


def test_bench_results_keep_a_dotted_model_name(tmp_path):
    """`tq bench --model qwen2.5-coder-0.5b` once wrote bench-cpu-qwen2.*: Path.stem and
    with_suffix cut the name at its last dot."""
    from turboquant_llama import bench, results

    assert results.model_label("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert results.model_label("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    rows = [{"k": k, "v": k, "test": "tg", "n": 32, "depth": 0, "tokens_per_s": t, "stddev": 0.0, "bpv": b,
             "protect_layers": 1, "backend": "CPU", "cpu": "x", "gpu": ""}
            for k, t, b in (("f16", 50.0, 16.0), ("q8_0", 52.0, 8.5), ("q4_0", 51.0, 4.5), ("tq3", 49.0, 3.25))]
    bench.write_results(rows, results.model_label("qwen2.5-coder-0.5b"), "cpu", "tq bench", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"bench-cpu-qwen2.5-coder-0.5b.{ext}" for ext in ("json", "md", "png")]
    assert "# llama-bench, qwen2.5-coder-0.5b, cpu" in (tmp_path / "bench-cpu-qwen2.5-coder-0.5b.md").read_text()


def test_recorded_command_names_a_corpus_that_is_not_the_packaged_one(tmp_path):
    """TQ_CORPUS is not an argument: a command recorded under it names the text it read."""
    from turboquant_llama import niah
    from turboquant_llama.cli import build_parser
    from turboquant_llama.corpus import wikitext2_test_path

    other = tmp_path / "text.raw"
    other.write_text("x\n")
    setting = switches.from_env({})
    args = build_parser().parse_args(["eval", "quality", "--model", "m"])
    assert "--corpus" not in ev._tq_command(args, setting, wikitext2_test_path())
    assert ev._tq_command(args, setting, other).endswith(f"--corpus {other}")
    args = build_parser().parse_args(["eval", "niah", "--model", "m"])
    assert "--filler" not in niah._command(args, setting, wikitext2_test_path())
    assert f"--filler {other}" in niah._command(args, setting, other)
