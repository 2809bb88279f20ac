"""The results files in results/ still load and render with today's code: the Markdown of each
quality file re-renders byte for byte from its JSON, each row's variant follows from the
switches it recorded, niah files recompute their recall and carry their switches in their name,
and bench tables re-render from their rows."""

from __future__ import annotations

import json

import pytest

from turboquant_llama import REPO_ROOT, bench, niah_results, quality_results, switches

RESULTS = REPO_ROOT / "results"
QUALITY = sorted(RESULTS.rglob("quality-*.json"))
NIAH = sorted(RESULTS.rglob("niah-*.json"))
BENCH = sorted(RESULTS.rglob("bench-*.json"))


def test_there_are_results_to_check():
    assert QUALITY and NIAH and BENCH


@pytest.mark.parametrize("path", QUALITY, ids=lambda p: str(p.relative_to(RESULTS)))
def test_quality_file_renders_its_markdown_again(path):
    data = quality_results.load_results(path)
    assert quality_results.render_markdown(data["model"], data) == path.with_suffix(".md").read_text()


def _parts(variant: str, recorded: set[str]) -> set[str]:
    """The parts of a variant whose switch the row recorded (graph_rotation: a knob since removed)."""
    env = {s.name: s.env for s in switches.SWITCHES} | {n: v for v, n in switches.RECORDED_OPTION_ENV.items()}
    return {part for part in variant.split(",") if part and env.get(part.split("=")[0], "TQ_GRAPH_ROTATION") in recorded
            and not part.startswith("graph_rotation=")}


@pytest.mark.parametrize("path", QUALITY, ids=lambda p: str(p.relative_to(RESULTS)))
def test_quality_rows_variant_follows_from_their_switches(path):
    """Older rows recorded fewer variables (the list was kept in several places): each row is
    checked on the variables it recorded."""
    for row in quality_results.load_results(path)["results"]:
        recorded = set(row.get("env") or {})
        env = {name: text for name, text in (row.get("env") or {}).items() if text is not None}
        got = switches.variant(row["k"], row["v"], switches.from_recorded_env(env))
        assert _parts(got, recorded) == _parts(row.get("variant", ""), recorded), row["tq_command"]


@pytest.mark.parametrize("path", NIAH, ids=lambda p: str(p.relative_to(RESULTS)))
def test_niah_file_recall_and_name(path):
    data = json.loads(path.read_text())
    assert niah_results.recall(data["cases"]) == data["recall"]
    assert niah_results.recall_by_length(data["cases"]) == data["recall_by_length"]
    s = data["settings"]
    setting = {"protect_layers": s.get("protect_layers", 1), "key_center": s.get("key_center", "on") == "on",
               "exact_sink": s.get("exact_sink", "on") == "on"}
    if path.parent == RESULTS:   # files in sub-folders were renamed by hand after the run
        assert path.stem == "niah-" + niah_results.results_name(data["model"], setting)
    assert f"| {next(iter(data['recall']))} |" in niah_results.render_markdown(data["model"], data)


@pytest.mark.parametrize("path", BENCH, ids=lambda p: str(p.relative_to(RESULTS)))
def test_bench_table_renders_again(path):
    data = json.loads(path.read_text())
    md = path.with_suffix(".md").read_text()
    for line in bench._ratio_table(data["rows"]):
        assert line in md
