"""`--json` where a command prints a table: `tq bench` (its rows, as in the results file) and
`tq models list` (the manifest with the cache state)."""

from __future__ import annotations

import json

from turboquant_llama.cli import main
from turboquant_llama.models import load_manifest, models_dir

from .conftest import require_binary
from .gguf_files import write_tiny_llama


def test_models_list_json(capsys):
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    manifest = load_manifest()
    assert [r["name"] for r in rows] == list(manifest)
    for r in rows:
        e = manifest[r["name"]]
        assert (r["file"], r["head_dim"], r["sha256"]) == (e.file, e.head_dim, e.sha256)
        assert r["cached"] == (models_dir() / e.file).exists()
    assert main(["models", "list"]) == 0
    assert rows[0]["name"] in capsys.readouterr().out


def test_bench_json(tmp_path, capsys):
    """A tiny random model (float32 weights) through llama-bench: the printed JSON is the rows of
    the results file, and the recorded command names every switch that was set."""
    require_binary("llama-bench")
    model = write_tiny_llama(tmp_path / "tiny.gguf", 64)
    rc = main(["bench", "--model", str(model), "--types", "f16,tq3/tq2", "--depths", "0", "--n-gen", "4",
               "--reps", "1", "--threads", "1", "--tq-key-center", "off", "--tq-exact-sink", "off", "--out-dir", str(tmp_path),
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = json.loads(captured.out)
    assert [(r["k"], r["v"], r["test"], r["depth"]) for r in rows] == [("f16", "f16", "tg", 0), ("tq3", "tq2", "tg", 0)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    saved = json.loads((tmp_path / "bench-cpu-tiny.json").read_text())
    assert saved["rows"] == rows
    assert saved["meta"]["command"].endswith("--tq-exact-sink off")
    assert saved["meta"]["switches"]["exact_sink"] == "off"
    assert (tmp_path / "bench-cpu-tiny.md").exists() and (tmp_path / "bench-cpu-tiny.png").stat().st_size > 1000
    assert main(["bench", "--model", str(model), "--types", "tq9"]) == 2
    assert "unknown cache type 'tq9'" in capsys.readouterr().err
    assert main(["bench", "--model", str(model), "--depths", "x"]) == 2
