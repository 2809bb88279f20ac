"""`tq bench --attention` (on with --gpu): parsing test-backend-ops perf output, the bytes a decoding
attention call reads, and a run of the patched test-backend-ops on the CPU backend."""

from __future__ import annotations

import json
import re

import pytest

from turboquant_llama import REPO_ROOT, fattn_perf

# a real test-backend-ops perf output of this kernel, on an H100 (results/cuda-gpu-h100.md)
H100_LOG = REPO_ROOT / "results" / "cuda-gpu-h100" / "2026-12-07b" / "fattn-perf-8warps.log"


def test_parse_keeps_the_decoding_cases_of_the_bench_shape():
    cases, copy_gbs = fattn_perf.parse_perf(H100_LOG.read_text())
    assert copy_gbs is None   # that log predates the copy case
    times = fattn_perf.attention_times(cases, copy_gbs=1000.0)
    by = {(t.pair, t.n_kv): t for t in times}
    # the log also holds other head sizes and GQA shapes: only 8 K/V heads of 128, GQA 4, one token stay
    assert len(cases) > len(times) and {32768, 65536} <= {t.n_kv for t in times}
    t = by[("tq3/tq2", 65536)]
    assert t.us == 53.83
    # tq3 rows of 128 values are two 26-byte blocks, tq2 two of 18: (52 + 36) bytes a cell and head
    assert t.mbytes == pytest.approx(65536 * 8 * 88 / 1e6)
    assert t.gb_per_s == pytest.approx(t.mbytes * 1e6 / 53.83e-6 / 1e9)
    assert by[("f16/f16", 65536)].mbytes == pytest.approx(65536 * 8 * 512 / 1e6)


def test_table_ratios_are_against_f16_of_the_same_depth():
    cases, _ = fattn_perf.parse_perf(H100_LOG.read_text())
    times = fattn_perf.attention_times(cases, copy_gbs=3000.0)
    row = next(line for line in fattn_perf.table(times, 3000.0) if line.startswith("| tq3/tq2 | 65536 |"))
    assert f"| {130.26 / 53.83:.2f}x |" in row
    assert f"| {100 * (65536 * 8 * 88 / 53.83e-6) / 3000e9:.0f}% |" in row


def test_copy_line_gives_reads_plus_writes():
    line = ("  CPY(type_src=f32,type_dst=f32,ne_src=[8192,8192,1,1],permute_src=[0,0,0,0],permute_dst=[0,0,0,0],"
            "_src_transpose=0):     2000 runs -   200.00 us/run -   524288 kB/run -  2500.00 GB/s\n"
            "  CPY(type_src=f32,type_dst=f32,ne_src=[8192,512,2,1],permute_src=[0,2,1,3],permute_dst=[0,0,0,0],"
            "_src_transpose=0):     2000 runs -    50.00 us/run -    65536 kB/run -  1250.00 GB/s\n")
    _, copy_gbs = fattn_perf.parse_perf(line)
    assert copy_gbs == pytest.approx(2 * 256 * 2**20 / 200e-6 / 1e9)


def test_cpu_backend_run_end_to_end(tmp_path):
    """The patched test-backend-ops has the copy case and the attention cases; one depth, two pairs on
    the CPU backend (what --gpu runs on CUDA0), written as results files."""
    from tests.conftest import require_binary

    require_binary("test-backend-ops")
    pairs = [("f16", "f16"), ("tq3", "tq2")]
    text = fattn_perf.run_perf(pairs, [8192], cuda=False, backend="CPU")
    copy = next(line for line in text.splitlines() if line.lstrip().startswith("CPY("))
    # our byte count is test-backend-ops' own (its kB/run is the op's source and destination bytes)
    assert int(re.search(r"(\d+) kB/run", copy).group(1)) * 1024 == 2 * 4 * 8192 * 8192
    times, copy_gbs = fattn_perf.times_of(text, pairs, backend="CPU")
    assert [(t.pair, t.n_kv) for t in times] == [("f16/f16", 8192), ("tq3/tq2", 8192)]
    assert copy_gbs > 0 and all(t.us > 0 and t.of_copy > 0 for t in times)
    stem = fattn_perf.write_results(times, copy_gbs, "test CPU", "cpu-test", "tq bench --attention", tmp_path)
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["meta"]["copy_gb_per_s"] == copy_gbs and len(data["rows"]) == 2
    assert "| tq3/tq2 | 8192 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0


def test_unknown_pairs_are_a_clear_error():
    from turboquant_llama.errors import UserError

    with pytest.raises(UserError, match="no attention perf case"):
        fattn_perf.run_perf([("q5_1", "q5_1")], [8192], cuda=False, backend="CPU")
