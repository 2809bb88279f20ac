"""`tq bench` keeps what it measured when llama-bench fails for some cells (a cache too large for the
GPU at the deepest depth): the pair's depths are run one at a time, the failed cells are listed with
llama-bench's reason in the results, and the command exits 1 (pytools/bench.py)."""

import json

from tests.conftest import fake_program

# a llama-bench that answers in its JSON for every depth of -d, unless K is f16 and a depth is 65536:
# then it fails as a CUDA build does when the cache does not fit (the whole run, as llama-bench does)
LLAMA_BENCH = """
a = sys.argv[1:]
depths = [int(d) for d in a[a.index("-d") + 1].split(",")]
if a[a.index("-ctk") + 1] == "f16" and 65536 in depths:
    print("llama_kv_cache: allocating 8192.00 MiB on device 0", file=sys.stderr)
    print("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 8192.00 MiB on device 0: cudaMalloc failed: out of memory", file=sys.stderr)
    print("main: error: failed to create context with model", file=sys.stderr)
    sys.exit(1)
if a[a.index("-ctk") + 1] == "q5_1":
    print("main: error: unsupported cache type", file=sys.stderr)
    sys.exit(1)
print(json.dumps([{"n_gen": 4, "n_prompt": 0, "n_depth": d, "avg_ts": 100.0 - d / 1024, "stddev_ts": 0.1,
                   "backends": "CPU", "cpu_info": "cpu", "gpu_info": ""} for d in depths]))
"""


def _bench(tmp_path, tiny_gguf, monkeypatch, types, depths):
    from turboquant_llama import bench
    from turboquant_llama.cli import main

    fake = fake_program(tmp_path / "llama-bench", LLAMA_BENCH)
    monkeypatch.setattr(bench, "find_binary", lambda name, cuda=False: fake)
    return main(["bench", "--model", str(tiny_gguf), "--types", types, "--depths", depths, "--n-gen", "4",
                 "--reps", "1", "--threads", "1", "--no-attention", "--out-dir", str(tmp_path)])


def test_the_depths_that_fit_are_kept_and_the_failed_ones_listed(tmp_path, tiny_gguf, monkeypatch, capfd):
    assert _bench(tmp_path, tiny_gguf, monkeypatch, "f16,tq3/tq2", "0,65536") == 1
    data = json.loads((tmp_path / "bench-cpu-tiny.json").read_text())
    assert [(r["k"], r["v"], r["depth"]) for r in data["rows"]] == [
        ("f16", "f16", 0), ("tq3", "tq2", 0), ("tq3", "tq2", 65536)]
    assert data["meta"]["failed"] == [{"k": "f16", "v": "f16", "depth": 65536, "error":
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 8192.00 MiB on device 0: cudaMalloc failed: out of memory"}]
    md = (tmp_path / "bench-cpu-tiny.md").read_text()
    assert "- f16/f16 at depth 65536: ggml_backend_cuda_buffer_type_alloc_buffer" in md
    assert "| tq3/tq2 | " in md and "| 65536 | 36.0 ± 0.1 |" in md
    err = capfd.readouterr().err
    assert "f16/f16 at depth 65536 not measured: " in err and "1 of 4 (pair, depth) cells not measured" in err


def test_a_run_that_measures_nothing_is_an_error_and_writes_nothing(tmp_path, tiny_gguf, monkeypatch, capfd):
    assert _bench(tmp_path, tiny_gguf, monkeypatch, "f16", "65536") == 2
    assert "llama-bench measured nothing: f16/f16 at depth 65536: " in capfd.readouterr().err
    assert not (tmp_path / "bench-cpu-tiny.json").exists()


def test_a_run_without_failures_lists_none(tmp_path, tiny_gguf, monkeypatch):
    assert _bench(tmp_path, tiny_gguf, monkeypatch, "tq3/tq2", "0,4096") == 0
    data = json.loads((tmp_path / "bench-cpu-tiny.json").read_text())
    assert "failed" not in data["meta"] and len(data["rows"]) == 2
    assert "Not measured" not in (tmp_path / "bench-cpu-tiny.md").read_text()
