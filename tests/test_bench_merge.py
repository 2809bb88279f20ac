"""`tq bench --merge`: one table from runs of one build that a single call could not hold (pytools/bench.py)."""

import json
from pathlib import Path

import pytest

from turboquant_llama import bench
from turboquant_llama.errors import UserError

SWITCHES = {"exact_sink": "on", "protect_layers": 1}


def _row(k, v, test, depth, tps):
    return {"k": k, "v": v, "test": test, "n": 32 if test == "tg" else 512, "depth": depth, "tokens_per_s": tps,
            "stddev": 0.0, "bpv": 16.0 if k == "f16" else 3.11, "protect_layers": 1, "backend": "CUDA",
            "cpu": "Xeon", "gpu": "H100"}


def _run(path, command, rows, **meta):
    m = {"command": command, "date": "2026-12-07T09:11:47+00:00", "switches": SWITCHES,
         "llama_cpp_commit": "0c1e570", "machine": "linux", "cpu": "Xeon", "gpu": "H100"}
    m.update(meta)
    path.write_text(json.dumps({"meta": m, "rows": rows}))
    return path


def _two_runs(tmp_path, **second_meta):
    a = _run(tmp_path / "a.json", "tq bench --model /m/random-llama-3.1-8b-q4_0.gguf --depths 0 --gpu",
             [_row("f16", "f16", "tg", 0, 300.0), _row("tq3", "tq2", "tg", 0, 240.0)])
    b = _run(tmp_path / "b.json", "tq bench --model /x/random-llama-3.1-8b-q4_0.gguf --depths 65536 --gpu",
             [_row("tq3", "tq2", "tg", 65536, 180.0), _row("f16", "f16", "tg", 65536, 120.0),
              _row("tq2", "tq2", "tg", 0, 270.0)], **second_meta)
    return a, b


def test_merged_rows_keep_their_run_and_take_ratios_across_runs(tmp_path):
    a, b = _two_runs(tmp_path)
    rows, model, metas = bench.merge_runs([a, b])
    assert model == "random-llama-3.1-8b-q4_0"
    assert [(r["k"], r["v"], r["depth"], r["run"]) for r in rows] == [
        ("f16", "f16", 0, 1), ("f16", "f16", 65536, 2), ("tq3", "tq2", 0, 1), ("tq3", "tq2", 65536, 2),
        ("tq2", "tq2", 0, 2)]
    table = bench._ratio_table(rows)
    # run 2's tq2 row at depth 0 is compared with run 1's f16 at depth 0
    assert "| tq2/tq2 (2) | 3.11 | tg32 | 0 | 270.0 ± 0.0 | 0.90x | - | - |" in table
    assert "| tq3/tq2 (2) | 3.11 | tg32 | 65536 | 180.0 ± 0.0 | 1.50x | - | - |" in table

    stem = bench.write_results(rows, model, "merged", "tq bench --merge a.json b.json", tmp_path, merged_from=metas)
    data = json.loads(Path(f"{stem}.json").read_text())
    assert [m["command"] for m in data["meta"]["merged_from"]] == [m["command"] for m in metas]
    assert data["meta"]["switches"] == SWITCHES
    md = Path(f"{stem}.md").read_text()
    assert "1. `tq bench --model /m/random-llama-3.1-8b-q4_0.gguf --depths 0 --gpu`" in md
    assert all(line in md for line in table)


@pytest.mark.parametrize("meta, match", [({"gpu": "H200"}, "gpu 'H200'"),
                                         ({"switches": {"exact_sink": "off", "protect_layers": 1}}, "switches"),
                                         ({"llama_cpp_commit": "other"}, "llama_cpp_commit")])
def test_runs_of_another_machine_build_or_setting_are_refused(tmp_path, meta, match):
    a, b = _two_runs(tmp_path, **meta)
    with pytest.raises(UserError, match=match):
        bench.merge_runs([a, b])


def test_a_measurement_taken_twice_is_refused(tmp_path):
    a, _ = _two_runs(tmp_path)
    again = _run(tmp_path / "c.json", "tq bench --model random-llama-3.1-8b-q4_0 --gpu", [_row("tq3", "tq2", "tg", 0, 250.0)])
    with pytest.raises(UserError, match="tq3/tq2 tg at depth 0 is in run 1 and run 2"):
        bench.merge_runs([a, again])


def test_other_models_one_file_and_non_bench_files_are_refused(tmp_path):
    a, _ = _two_runs(tmp_path)
    other = _run(tmp_path / "o.json", "tq bench --model smollm2", [_row("f16", "f16", "tg", 4096, 90.0)])
    with pytest.raises(UserError, match="model smollm2"):
        bench.merge_runs([a, other])
    with pytest.raises(UserError, match="two or more"):
        bench.merge_runs([a])
    junk = tmp_path / "junk.json"
    junk.write_text('{"rows": []}')
    with pytest.raises(UserError, match="not a results file of `tq bench`"):
        bench.merge_runs([a, junk])


def test_merge_measures_nothing(tmp_path, capsys):
    from turboquant_llama.cli import main

    a, b = _two_runs(tmp_path)
    assert main(["bench", "--merge", str(a), str(b), "--tag", "t", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "bench-t-random-llama-3.1-8b-q4_0.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["bench", "--merge", str(a), str(b), "--types", "f16"]) == 2
    assert "--merge measures nothing" in capsys.readouterr().err


def test_a_cell_one_run_failed_stays_listed_unless_another_run_measured_it(tmp_path):
    a, b = _two_runs(tmp_path)
    data = json.loads(a.read_text())
    data["meta"]["failed"] = [{"k": "f16", "v": "f16", "depth": 65536, "error": "out of memory"},
                              {"k": "tq4", "v": "tq4", "depth": 0, "error": "out of memory"}]
    a.write_text(json.dumps(data))
    rows, model, metas = bench.merge_runs([a, b])
    assert metas[0]["failed"] == [{"k": "tq4", "v": "tq4", "depth": 0, "error": "out of memory", "run": 1}]
    assert metas[1]["failed"] == []
