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
    """The options are llama.cpp flags and llama_context_params fields (patches/0008), and
    llama-cpp-python keyword arguments (patches/llama-cpp-python); no patch reads them from the
    environment."""
    patches = "\n".join(p.read_text() for p in sorted((REPO_ROOT / "patches").rglob("*.patch")))
    for flag in ("--tq-protect-layers", "--tq-key-means", "--no-tq-exact-sink"):
        assert f'"{flag}"' in patches, flag
    for field in ("tq_protect_layers", "tq_key_means", "tq_exact_sink"):
        assert f"cparams.{field}" in patches and f'("{field}", ' in patches, field
    assert not {"TQ_PROTECT_LAYERS", "TQ_KEY_CENTER", "TQ_EXACT_SINK", "TQ_GRAPH_ROTATION"} & _read_by_sources()
    assert all(s.env is None for s in switches.OPTIONS)


def test_values_are_parsed_like_c_atoi():
    assert switches.from_env({}) == switches.defaults()
    d = switches.defaults()
    assert (d["protect_layers"], d["key_center"], d["exact_sink"], d["attn_rot"]) == (1, True, True, True)
    got = switches.from_env({"TQ_PROTECT_LAYERS": "-3", "TQ_KEY_CENTER": "off", "TQ_ATTN_ROWS": " 0x",
                             "LLAMA_ATTN_ROT_DISABLE": "1", "TQ_CPU_SIMD": "avx2"})
    assert got["protect_layers"] == 1 and got["key_center"] is True   # options: never from the environment
    assert got["attn_rot"] is False and got["attn_rows"] is False and got["cpu_simd"] == "avx2"
    assert switches.non_default(got) == {"attn_rot": False, "attn_rows": False, "cpu_simd": "avx2"}


def test_child_env_and_llama_args():
    setting = switches.from_env({"TQ_ATTN_ROWS": "0"})
    setting.update(key_center=False, exact_sink=False, protect_layers=2)
    env = switches.child_env(setting, {"TQ_SCALE_SEARCH": "1", "PATH": "/bin"})
    assert env["PATH"] == "/bin" and env["TQ_ATTN_ROWS"] == "0"
    assert "TQ_SCALE_SEARCH" not in env                                   # a default: nothing stale is left
    assert switches.llama_args(setting, "smollm2", "tq3") == ["--no-tq-exact-sink", "--tq-protect-layers", "2"]
    assert switches.llama_args(switches.defaults(), None, "tq3") == []      # no model: no key means to give
    assert switches.llama_args(switches.defaults(), "smollm2", "q8_0") == []  # centering needs TQ keys
    assert switches.llama_kwargs(setting, "smollm2", "tq3") == {"tq_protect_layers": 2, "tq_key_means": None,
                                                               "tq_exact_sink": False}


def test_key_centering_gives_llama_cpp_the_calibrated_means(monkeypatch, tmp_path):
    from turboquant_llama import calibrate

    means = tmp_path / "means.gguf"
    monkeypatch.setattr(calibrate, "key_means", lambda model, *a, **k: means)
    assert switches.llama_args(switches.defaults(), "smollm2", "tq3") == ["--tq-key-means", str(means)]
    assert switches.llama_kwargs(switches.defaults(), "smollm2", "tq4")["tq_key_means"] == str(means)


def test_tq3c_keys_get_the_calibration_for_their_context(monkeypatch, tmp_path):
    """tq3c keys get the transforms calibrated for the context they run (llama.cpp's padding
    included), centering or not; the default where the context is not known."""
    from turboquant_llama import calibrate

    asked = []
    monkeypatch.setattr(calibrate, "tq3c_transforms", lambda model, n_ctx: asked.append(n_ctx) or tmp_path / f"{n_ctx}.gguf")
    off = switches.defaults() | {"key_center": False}
    assert switches.llama_args(off, "smollm2", "tq3c", 4160) == ["--tq-key-means", str(tmp_path / "4352.gguf")]
    assert switches.llama_kwargs(switches.defaults(), "smollm2", "tq3c", 512)["tq_key_means"] == str(tmp_path / "512.gguf")
    assert switches.llama_args(switches.defaults(), "smollm2", "tq3c") == ["--tq-key-means", str(tmp_path / "4096.gguf")]
    assert asked == [4352, 512, calibrate.TQ3C_CTX]


def test_variant_names_the_switches_that_change_a_pair():
    setting = switches.from_env({"TQ_SCALE_SEARCH": "0", "TQ_ATTN_ROWS": "0", "TQ_CPU_SIMD": "scalar"})
    setting["key_center"] = False
    assert switches.variant("tq4", "tq4", setting) == "scale_search=off,key_center=off,attn_rows=off"
    assert switches.variant("q8_0", "tq2", setting) == "scale_search=off,attn_rows=off"
    assert switches.variant("q8_0", "q8_0", setting) == ""


def test_describe_lists_every_switch():
    d = switches.describe({**switches.defaults(), "exact_sink": False})
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


def test_setting_from_kwargs_takes_the_keyword_arguments():
    kwargs = {"tq_key_center": False, "tq_protect_layers": 2, "n_ctx": 256}
    setting = switches.setting_from_kwargs(kwargs)
    assert kwargs == {"n_ctx": 256}
    assert (setting["key_center"], setting["protect_layers"], setting["exact_sink"]) == (False, 2, True)
    for bad in ({"tq_key_center": 1}, {"tq_protect_layers": -1}, {"tq_protect_layers": True}):
        with pytest.raises(ValueError):
            switches.setting_from_kwargs(dict(bad))
