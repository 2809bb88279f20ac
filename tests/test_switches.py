"""The one registry of switches (pytools/switches.py): it lists every switch the patched llama.cpp
and ggml_tq read, parses values as llama.cpp does, hands a setting to a child process, and a
recorded command reproduces its setting."""

from __future__ import annotations

import re
import shlex

import pytest

from turboquant_llama import REPO_ROOT, switches
from turboquant_llama.cli import build_parser

_READ = re.compile(r"(?:getenv|tq_env_off|tq_env_switch)\(\s*\"([A-Z_]+)\"")
UPSTREAM_KNOBS = {"LLAMA_ATTN_ROT_DISABLE"}   # read by llama.cpp itself, not by our patches


def _read_by_sources() -> set[str]:
    """Environment variables our C sources and the added lines of our patches read."""
    names: set[str] = set()
    for path in sorted((REPO_ROOT / "ggml_tq").glob("*.[ch]")):
        names |= set(_READ.findall(path.read_text()))
    for path in sorted((REPO_ROOT / "patches").glob("*.patch")):
        added = "\n".join(line for line in path.read_text().splitlines() if line.startswith("+"))
        names |= set(_READ.findall(added))
    return names


def test_registry_lists_every_switch_the_sources_read():
    read = _read_by_sources()
    assert read, "the pattern found no switch at all: it no longer matches how the sources read them"
    assert read <= set(switches.ENV_NAMES), f"switches read but not listed in switches.py: {read - set(switches.ENV_NAMES)}"
    knobs = {s.env for s in switches.SWITCHES if not s.option} - UPSTREAM_KNOBS
    assert knobs <= read, f"switches.py lists knobs nothing reads: {knobs - read}"


def test_options_reach_llama_cpp_the_way_the_patches_take_them():
    """While OPTIONS_AS_FLAGS is False the patches read the options' variables; once the patches
    take the options as flags, the constant must say so (the one place to change)."""
    patches = "\n".join(p.read_text() for p in sorted((REPO_ROOT / "patches").glob("*.patch")))
    read = _read_by_sources()
    for s in switches.OPTIONS:
        if switches.OPTIONS_AS_FLAGS:
            assert s.flag in patches and s.param in patches, s.name
        else:
            assert s.env in read, f"{s.env} is no longer read from the environment: set OPTIONS_AS_FLAGS = True"


def test_values_are_parsed_like_c_atoi():
    assert switches.from_env({}) == switches.defaults()
    d = switches.defaults()
    assert (d["protect_layers"], d["key_center"], d["exact_sink"], d["attn_rot"], d["graph_rotation"]) == (1, True, True, True, False)
    got = switches.from_env({"TQ_PROTECT_LAYERS": "-3", "TQ_KEY_CENTER": "off", "TQ_EXACT_SINK": " 2x",
                             "LLAMA_ATTN_ROT_DISABLE": "1", "TQ_GRAPH_ROTATION": "0", "TQ_CPU_SIMD": "avx2"})
    assert got["protect_layers"] == 0 and got["key_center"] is False and got["exact_sink"] is True
    assert got["attn_rot"] is False and got["graph_rotation"] is False and got["cpu_simd"] == "avx2"
    assert switches.non_default(got) == {"protect_layers": 0, "key_center": False, "attn_rot": False, "cpu_simd": "avx2"}


def test_child_env_sets_and_clears_the_variables():
    setting = switches.from_env({"TQ_ATTN_ROWS": "0"})
    setting["key_center"] = False
    env = switches.child_env(setting, {"TQ_EXACT_SINK": "0", "PATH": "/bin", "TQ_PROTECT_LAYERS": "1"})
    assert env["PATH"] == "/bin" and env["TQ_ATTN_ROWS"] == "0"
    assert "TQ_EXACT_SINK" not in env and "TQ_PROTECT_LAYERS" not in env   # defaults: nothing stale is left
    if switches.OPTIONS_AS_FLAGS:
        assert "TQ_KEY_CENTER" not in env
        assert switches.llama_args(setting) == ["--tq-key-center", "off"]
    else:
        assert env["TQ_KEY_CENTER"] == "0"
        assert switches.llama_args(setting) == []


def test_variant_names_the_switches_that_change_a_pair():
    setting = switches.from_env({"TQ_KEY_CENTER": "0", "TQ_SCALE_SEARCH": "0", "TQ_ATTN_ROWS": "0", "TQ_CPU_SIMD": "scalar"})
    assert switches.variant("tq4", "tq4", setting) == "scale_search=off,key_center=off,attn_rows=off"
    assert switches.variant("q8_0", "tq2", setting) == "scale_search=off,attn_rows=off"
    assert switches.variant("q8_0", "q8_0", setting) == ""


def test_describe_lists_every_switch():
    d = switches.describe(switches.from_env({"TQ_EXACT_SINK": "0"}))
    assert list(d) == [s.name for s in switches.SWITCHES]
    assert d["exact_sink"] == "off" and d["key_center"] == "on" and d["protect_layers"] == 1 and d["cpu_simd"] is None


@pytest.mark.parametrize("argv", [["eval", "quality", "--model", "m"], ["eval", "niah", "--model", "m"], ["bench"]])
def test_recorded_command_reproduces_its_setting(argv):
    """What a results file records as its command, parsed again, gives the same setting."""
    setting = switches.from_env({"TQ_ATTN_ROWS": "0", "LLAMA_ATTN_ROT_DISABLE": "1"})
    setting.update(protect_layers=2, key_center=False)
    command = switches.tq_command(["tq", *argv], setting)
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-") and w[0].isupper())
    args = build_parser().parse_args([w for w in words if w not in {f"{k}={v}" for k, v in env.items()}][1:])
    assert switches.apply_args(args, env) == setting
    assert command.startswith("LLAMA_ATTN_ROT_DISABLE=1 TQ_ATTN_ROWS=0 tq ")
    assert command.endswith(" --tq-key-center off --tq-protect-layers 2")


def test_bad_option_values_are_clear_errors(capsys):
    from turboquant_llama.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tq-key-center", "maybe"])
    assert exc.value.code == 2 and "is not on or off" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mem", "--tq-protect-layers", "-1"])
    assert "-1 is out of range: a layer count at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # tq mem takes only the option that changes a cache's size
        main(["mem", "--tq-key-center", "off"])


def test_options_for_context_takes_the_keyword_arguments(monkeypatch):
    import os

    monkeypatch.setenv("TQ_EXACT_SINK", "0")
    monkeypatch.delenv("TQ_KEY_CENTER", raising=False)
    kwargs = {"tq_key_center": False, "tq_protect_layers": 2, "n_ctx": 256}
    with switches.options_for_context(kwargs) as extra:
        assert kwargs == {"n_ctx": 256}
        if switches.OPTIONS_AS_FLAGS:
            assert extra == {"tq_key_center": False, "tq_protect_layers": 2}
        else:
            assert extra == {}
            assert (os.environ["TQ_KEY_CENTER"], os.environ["TQ_PROTECT_LAYERS"]) == ("0", "2")
            assert os.environ["TQ_EXACT_SINK"] == "0"       # not given: the environment's stays
    assert "TQ_KEY_CENTER" not in os.environ and "TQ_PROTECT_LAYERS" not in os.environ
    assert os.environ["TQ_EXACT_SINK"] == "0"
    for bad in ({"tq_key_center": 1}, {"tq_protect_layers": -1}, {"tq_protect_layers": True}):
        with pytest.raises(ValueError):
            with switches.options_for_context(dict(bad)):
                pass
