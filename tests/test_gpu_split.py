"""--split-mode, --tensor-split and --main-gpu (pytools/gpu_split.py): what reaches each llama.cpp
program and llama-cpp-python, and the refusals.

No GPU is needed: fake llama-completion, llama-server, llama-perplexity and llama-bench programs
record the arguments they were given, and a recording class stands in for llama_cpp.Llama. What
several GPUs then do with the options is llama.cpp's (not measured here: results/two-gpus/run.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import types
from pathlib import Path

import pytest

from turboquant_llama import gpu_split
from turboquant_llama.errors import UserError
from turboquant_llama.gpu_split import GpuSplit, SplitError

from .conftest import fake_program

SPLIT_FLAGS = ("-sm", "-ts", "-mg", "--split-mode", "--tensor-split", "--main-gpu")


def _main(argv: list[str]) -> int:
    from turboquant_llama.cli import main

    return main(argv)


def _recorder(path: Path, argv_file: Path, body: str = "") -> Path:
    """A fake llama.cpp program that appends its arguments (one JSON list per line) to argv_file."""
    return fake_program(path, f"open({str(argv_file)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n" + body)


def _runs(argv_file: Path) -> list[list[str]]:
    return [json.loads(line) for line in argv_file.read_text().splitlines()]


def _split_flags(argv: list[str]) -> list[str]:
    """The split options of a command line and their values, in order."""
    out = []
    for i, arg in enumerate(argv):
        if arg in SPLIT_FLAGS:
            out += [arg, argv[i + 1]]
    return out


# --------------------------------------------------------------------------- parsing and checks

@pytest.mark.parametrize("text,shares", [("3,1", (3.0, 1.0)), ("0.75,0.25", (0.75, 0.25)), ("1", (1.0,)),
                                         (" 2 , 0 ", (2.0, 0.0)), ("1e1,5", (10.0, 5.0))])
def test_tensor_split_parses(text, shares):
    assert gpu_split.parse_tensor_split(text) == shares


@pytest.mark.parametrize("text,message", [
    ("", "comma-separated"), ("3,,1", "comma-separated"), ("3;1", "comma-separated"), ("3/1", "comma-separated"),
    ("a,b", "comma-separated"), ("-1,2", "0 or more"), ("nan,1", "finite"), ("inf", "finite"),
    ("0,0", "every proportion is 0"), (",".join(["1"] * 16), "at most 15"),
])
def test_tensor_split_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        gpu_split.parse_tensor_split(text)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        gpu_split.tensor_split_arg(text)


def test_tensor_split_from_python_values():
    assert gpu_split.parse_tensor_split([3, 1]) == (3.0, 1.0)
    assert gpu_split.parse_tensor_split((0.5, 0.5)) == (0.5, 0.5)
    for bad in ([True, 1], ["3", "1"], [None]):
        with pytest.raises(ValueError, match="give numbers"):
            gpu_split.parse_tensor_split(bad)
    with pytest.raises(ValueError, match="no proportion"):
        gpu_split.parse_tensor_split([])


def test_llama_args_only_for_what_is_given():
    assert gpu_split.llama_args(GpuSplit()) == []
    assert gpu_split.llama_args(GpuSplit("layer")) == ["-sm", "layer"]
    assert gpu_split.llama_args(GpuSplit(tensor_split=(3.0, 1.0))) == ["-ts", "3,1"]
    assert gpu_split.llama_args(GpuSplit("none", main_gpu=1)) == ["-sm", "none", "-mg", "1"]
    assert gpu_split.llama_args(GpuSplit("layer", (0.75, 0.25))) == ["-sm", "layer", "-ts", "0.75,0.25"]
    # llama-bench reads ',' as a list of values to test one after another: a split's shares take '/'
    assert gpu_split.llama_args(GpuSplit("layer", (3.0, 1.0)), bench=True) == ["-sm", "layer", "-ts", "3/1"]
    assert gpu_split.command_parts(GpuSplit("none", None, 1)) == ["--split-mode", "none", "--main-gpu", "1"]


@pytest.mark.parametrize("split,offloaded,rpc,message", [
    (GpuSplit("layer"), False, False, r"--split-mode: no layer goes to a GPU.*give --gpu-layers \(-ngl\) N"),
    (GpuSplit(tensor_split=(1.0, 1.0)), False, False, "--tensor-split: no layer goes to a GPU"),
    (GpuSplit("row"), True, False, "no row split for CUDA.*does not support split buffers.*use --split-mode layer"),
    (GpuSplit("row"), True, True, "use --split-mode layer \\(the RPC servers take whole layers\\)"),
    (GpuSplit(main_gpu=1), True, False, "--main-gpu picks the one GPU of --split-mode none"),
    (GpuSplit("layer", main_gpu=1), True, False, "add --split-mode none, or leave --main-gpu out"),
    (GpuSplit("none", (1.0, 1.0)), True, False, "--tensor-split shares layers among GPUs, and --split-mode none"),
])
def test_check_split_refuses(split, offloaded, rpc, message):
    with pytest.raises(SplitError, match=message):
        gpu_split.check_split(split, offloaded, rpc)


@pytest.mark.parametrize("split", [GpuSplit(), GpuSplit("layer"), GpuSplit("layer", (3.0, 1.0)), GpuSplit("none"),
                                   GpuSplit("none", main_gpu=1), GpuSplit(tensor_split=(1.0, 0.0))])
def test_check_split_accepts(split):
    gpu_split.check_split(split, True, False)
    gpu_split.check_split(split, True, True)


def test_nothing_given_needs_no_offload():
    gpu_split.check_split(GpuSplit(), False, False)


def test_split_error_is_both_kinds():
    """tq's commands report a UserError in one line; load_llama's callers catch ValueError."""
    assert issubclass(SplitError, UserError) and issubclass(SplitError, ValueError)


# --------------------------------------------------------------------------- tq run: llama-completion

def _run_argv(tmp_path, tiny_gguf, monkeypatch, options: list[str]) -> list[str]:
    from turboquant_llama import generate

    argv_file = tmp_path / "argv.jsonl"
    fake = _recorder(tmp_path / "llama-completion", argv_file)
    asked = []
    monkeypatch.setattr(generate, "find_binary", lambda name, cuda=False: asked.append(cuda) or fake)
    assert _main(["run", "--model", str(tiny_gguf), "-n", "2"] + options) == 0
    assert asked == [True]   # the CUDA build
    (argv,) = _runs(argv_file)
    return argv


def test_run_passes_the_split_on(tmp_path, tiny_gguf, monkeypatch):
    argv = _run_argv(tmp_path, tiny_gguf, monkeypatch, ["-ngl", "99", "--split-mode", "layer", "-ts", "3,1"])
    assert _split_flags(argv) == ["-sm", "layer", "-ts", "3,1"]
    assert argv[argv.index("-ngl") + 1] == "99"


def test_run_passes_main_gpu_with_split_mode_none(tmp_path, tiny_gguf, monkeypatch):
    argv = _run_argv(tmp_path, tiny_gguf, monkeypatch, ["-ngl", "-1", "-sm", "none", "--main-gpu", "1"])
    assert _split_flags(argv) == ["-sm", "none", "-mg", "1"]


def test_run_without_split_options_leaves_llama_cpp_defaults(tmp_path, tiny_gguf, monkeypatch):
    argv = _run_argv(tmp_path, tiny_gguf, monkeypatch, ["-ngl", "99"])
    assert _split_flags(argv) == []


@pytest.mark.parametrize("options,message", [
    (["--split-mode", "layer"], "no layer goes to a GPU, so there is nothing to split: give --gpu-layers"),
    (["-ngl", "99", "-sm", "row"], "no row split"),
    (["-ngl", "99", "-mg", "1"], "picks the one GPU of --split-mode none"),
])
def test_run_refuses_before_starting(tmp_path, tiny_gguf, monkeypatch, capfd, options, message):
    from turboquant_llama import generate

    argv_file = tmp_path / "argv.jsonl"
    fake = _recorder(tmp_path / "llama-completion", argv_file)
    monkeypatch.setattr(generate, "find_binary", lambda name, cuda=False: fake)
    assert _main(["run", "--model", str(tiny_gguf), "-n", "2"] + options) == 2
    assert message in capfd.readouterr().err
    assert not argv_file.exists()   # nothing was started


@pytest.mark.parametrize("options,message", [
    (["-ngl", "99", "-ts", "3,x"], "give comma-separated proportions"),
    (["-ngl", "99", "-ts", "0,0"], "every proportion is 0"),
    (["-ngl", "99", "-mg", "-1"], "a GPU index at least 0"),
    (["-ngl", "99", "-sm", "tensor"], "invalid choice: 'tensor'"),
])
def test_malformed_options_are_usage_errors(tiny_gguf, capsys, options, message):
    with pytest.raises(SystemExit) as info:
        _main(["run", "--model", str(tiny_gguf)] + options)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_run_with_rpc_refuses_row_before_any_connection(monkeypatch, capfd):
    """--rpc with -sm row: refused before tq knocks at the servers (nothing listens at the address)."""
    from turboquant_llama import rpc

    probed = []
    monkeypatch.setattr(rpc, "probe_server", lambda endpoint, timeout=0: probed.append(endpoint))
    assert _main(["run", "--rpc", "127.0.0.1:9", "-ngl", "10", "-sm", "row"]) == 2
    assert "the RPC servers take whole layers" in capfd.readouterr().err and probed == []


# --------------------------------------------------------------------------- tq serve: llama-server

@pytest.fixture()
def fake_server(tmp_path, monkeypatch):
    """llama-server replaced by a recorder that exits at once."""
    from turboquant_llama import serve

    argv_file = tmp_path / "argv.jsonl"
    fake = _recorder(tmp_path / "llama-server", argv_file)
    monkeypatch.setattr(serve, "find_binary", lambda name, cuda=False: fake)
    monkeypatch.delenv("AIP_MODE", raising=False)
    return argv_file


def test_serve_passes_the_split_on(fake_server, tiny_gguf):
    assert _main(["serve", "--model", str(tiny_gguf), "--cuda", "--gpu-layers", "99", "--split-mode", "layer",
                  "--tensor-split", "1,1"]) == 0
    (argv,) = _runs(fake_server)
    assert _split_flags(argv) == ["-sm", "layer", "-ts", "1,1"]


def test_serve_without_split_options_leaves_llama_cpp_defaults(fake_server, tiny_gguf):
    assert _main(["serve", "--model", str(tiny_gguf), "--cuda", "--gpu-layers", "99"]) == 0
    (argv,) = _runs(fake_server)
    assert _split_flags(argv) == []


@pytest.mark.parametrize("options,message", [
    (["--split-mode", "layer"], "give --gpu-layers N (e.g. 99: every layer) and --cuda"),
    (["-ngl", "99", "--split-mode", "layer"], "give --cuda (the CPU build's llama-server has no GPU)"),
    (["--cuda", "-ngl", "99", "-sm", "row"], "no row split"),
])
def test_serve_refuses_a_split_that_does_nothing(fake_server, tiny_gguf, capfd, options, message):
    assert _main(["serve", "--model", str(tiny_gguf)] + options) == 2
    assert message in capfd.readouterr().err and not fake_server.exists()


@pytest.mark.parametrize("extra,own", [(["-sm", "row"], "--split-mode"), (["--tensor-split", "1,1"], "--tensor-split"),
                                       (["-mg", "1"], "--main-gpu"), (["--split_mode=layer"], "--split-mode")])
def test_serve_refuses_split_options_after_dashdash(fake_server, tiny_gguf, capfd, extra, own):
    assert _main(["serve", "--model", str(tiny_gguf), "--cuda", "-ngl", "99", "--"] + extra) == 2
    assert f"use tq serve's {own}" in capfd.readouterr().err and not fake_server.exists()


# --------------------------------------------------------------------------- tq eval quality: llama-perplexity

PERPLEXITY_BODY = """
if "--kl-divergence" in sys.argv:
    print("Mean PPL(Q)                   :  33.860326 ±   1.469699")
    print("Mean    KLD:   0.193574 ±   0.003874")
    print("Same top p: 74.255 ± 0.612 %")
else:
    open(sys.argv[sys.argv.index("--kl-divergence-base") + 1], "wb").write(b"logits")
    print("Final estimate: PPL = 28.0278 +/- 1.22815")
"""


def _eval_runs(tmp_path, tiny_gguf, monkeypatch, options: list[str]) -> list[list[str]]:
    from turboquant_llama import build

    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path / "cache"))   # the saved f16 logits go there
    argv_file = tmp_path / "argv.jsonl"
    (tmp_path / "bin").mkdir()   # the build's fingerprint hashes the libraries next to the program
    fake = _recorder(tmp_path / "bin" / "llama-perplexity", argv_file, PERPLEXITY_BODY)
    monkeypatch.setattr(build, "find_binary", lambda name, cuda=False: fake)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    assert _main(["eval", "quality", "--model", str(tiny_gguf), "--types", "tq3/tq2", "--chunks", "1", "--ctx", "16",
                  "--threads", "1", "--corpus", str(corpus), "--out-dir", str(tmp_path / "out")] + options) == 0
    return _runs(argv_file)


def test_eval_passes_the_split_to_the_base_and_every_pair(tmp_path, tiny_gguf, monkeypatch):
    runs = _eval_runs(tmp_path, tiny_gguf, monkeypatch, ["--cuda", "--split-mode", "layer", "-ts", "3,1"])
    assert len(runs) == 2   # the f16 base, then tq3/tq2
    for argv in runs:
        assert _split_flags(argv) == ["-sm", "layer", "-ts", "3,1"]
        assert argv[argv.index("-ngl") + 1] == "99"
    saved = json.loads((tmp_path / "out" / "quality-tiny.json").read_text())
    assert "--cuda --split-mode layer --tensor-split 3,1" in saved["runs"][-1]["tq_command"]


def test_eval_keeps_a_split_base_apart(tmp_path, tiny_gguf, monkeypatch):
    """The f16 logits of a split run are saved under their own key; an unsplit run's key is as before."""
    from turboquant_llama.perplexity import base_key

    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    plain = base_key("tiny", tiny_gguf, corpus, 512, 20, True)
    assert base_key("tiny", tiny_gguf, corpus, 512, 20, True, GpuSplit()) == plain
    assert base_key("tiny", tiny_gguf, corpus, 512, 20, True, GpuSplit("layer")) != plain
    assert base_key("tiny", tiny_gguf, corpus, 512, 20, True, GpuSplit("layer")) != \
        base_key("tiny", tiny_gguf, corpus, 512, 20, True, GpuSplit("layer", (3.0, 1.0)))


def test_eval_without_split_options_leaves_llama_cpp_defaults(tmp_path, tiny_gguf, monkeypatch):
    for argv in _eval_runs(tmp_path, tiny_gguf, monkeypatch, ["--cuda"]):
        assert _split_flags(argv) == []


def test_eval_refuses_a_split_on_the_cpu(tiny_gguf, capfd):
    assert _main(["eval", "quality", "--model", str(tiny_gguf), "--split-mode", "layer"]) == 2
    assert "nothing to split: add --cuda" in capfd.readouterr().err


# --------------------------------------------------------------------------- tq bench: llama-bench

BENCH_BODY = """
print(json.dumps([{"n_gen": 4, "n_prompt": 0, "n_depth": 0, "avg_ts": 10.0, "stddev_ts": 0.1,
                   "backends": "CUDA", "cpu_info": "cpu", "gpu_info": "gpu0, gpu1"}]))
"""


def _bench_runs(tmp_path, tiny_gguf, monkeypatch, options: list[str]) -> list[list[str]]:
    from turboquant_llama import bench

    argv_file = tmp_path / "argv.jsonl"
    fake = _recorder(tmp_path / "llama-bench", argv_file, BENCH_BODY)
    monkeypatch.setattr(bench, "find_binary", lambda name, cuda=False: fake)
    assert _main(["bench", "--model", str(tiny_gguf), "--types", "f16,tq3/tq2", "--depths", "0", "--n-gen", "4",
                  "--reps", "1", "--threads", "1", "--no-attention", "--json", "--out-dir", str(tmp_path)] + options) == 0
    return _runs(argv_file)


def test_bench_passes_the_split_in_llama_bench_spelling(tmp_path, tiny_gguf, monkeypatch):
    runs = _bench_runs(tmp_path, tiny_gguf, monkeypatch, ["--gpu", "--split-mode", "layer", "--tensor-split", "3,1"])
    assert len(runs) == 2
    for argv in runs:
        assert _split_flags(argv) == ["-sm", "layer", "-ts", "3/1"]
        assert argv[argv.index("-ngl") + 1] == "99"
    saved = json.loads((tmp_path / "bench-gpu-tiny.json").read_text())
    assert "--gpu --split-mode layer --tensor-split 3,1" in saved["meta"]["command"]


def test_bench_without_split_options_leaves_llama_cpp_defaults(tmp_path, tiny_gguf, monkeypatch):
    for argv in _bench_runs(tmp_path, tiny_gguf, monkeypatch, ["--cuda"]):
        assert _split_flags(argv) == []


def test_bench_refuses_a_split_on_the_cpu(tiny_gguf, capfd):
    assert _main(["bench", "--model", str(tiny_gguf), "-sm", "layer"]) == 2
    assert "nothing to split: add --gpu (or --cuda)" in capfd.readouterr().err


# --------------------------------------------------------------------------- load_llama, tq chat, tq eval niah

class _FakeLlamaCpp(types.SimpleNamespace):
    """llama_cpp as load_llama uses it, with split constants that differ from llama.cpp's values
    (so a name mapped to the wrong constant shows), and a Llama that records its arguments."""

    def __init__(self):
        created: list[dict] = []

        class Llama:
            def __init__(self, **kw):
                created.append(kw)

        super().__init__(Llama=Llama, created=created, LLAMA_SPLIT_MODE_NONE=100, LLAMA_SPLIT_MODE_LAYER=101,
                         LLAMA_SPLIT_MODE_ROW=102)


@pytest.fixture()
def fake_llama_cpp(monkeypatch, tiny_gguf):
    from turboquant_llama import llama_python

    fake = _FakeLlamaCpp()
    monkeypatch.setattr(llama_python, "import_llama_cpp", lambda cuda=None: fake)
    return fake


def test_load_llama_forwards_the_split(fake_llama_cpp, tiny_gguf):
    from turboquant_llama.llama_python import load_llama

    load_llama(tiny_gguf, "tq3", "tq2", n_ctx=256, n_gpu_layers=99, split_mode="layer", tensor_split="3,1")
    load_llama(tiny_gguf, "f16", "f16", n_ctx=256, n_gpu_layers=-1, split_mode="none", main_gpu=1)
    load_llama(tiny_gguf, "f16", "f16", n_ctx=256, n_gpu_layers=99, tensor_split=[0.5, 0.5])
    first, second, third = fake_llama_cpp.created
    assert (first["split_mode"], first["tensor_split"], first["n_gpu_layers"]) == (101, [3.0, 1.0], 99)
    assert "main_gpu" not in first
    assert (second["split_mode"], second["main_gpu"]) == (100, 1) and "tensor_split" not in second
    assert third["tensor_split"] == [0.5, 0.5] and "split_mode" not in third and "main_gpu" not in third


def test_load_llama_without_split_leaves_llama_cpp_python_defaults(fake_llama_cpp, tiny_gguf):
    from turboquant_llama.llama_python import load_llama

    load_llama(tiny_gguf, "tq3", "tq2", n_ctx=256, n_gpu_layers=99)
    (kw,) = fake_llama_cpp.created
    assert not {"split_mode", "tensor_split", "main_gpu"} & set(kw)


@pytest.mark.parametrize("kw,message", [
    ({"split_mode": "layer"}, "split_mode: no layer goes to a GPU.*give n_gpu_layers N"),
    ({"n_gpu_layers": 99, "split_mode": "row"}, "split_mode row: .*use split_mode layer"),
    ({"n_gpu_layers": 99, "split_mode": 1}, "split_mode 1: give one of none, layer, row"),
    ({"n_gpu_layers": 99, "main_gpu": 1}, "main_gpu picks the one GPU of split_mode none"),
    ({"n_gpu_layers": 99, "main_gpu": -1}, "main_gpu -1: give a GPU index"),
    ({"n_gpu_layers": 99, "tensor_split": "3;1"}, "comma-separated"),
    ({"n_gpu_layers": 99, "split_mode": "none", "tensor_split": [1, 1]}, "tensor_split shares layers"),
])
def test_load_llama_refuses(fake_llama_cpp, tiny_gguf, kw, message):
    from turboquant_llama.llama_python import load_llama

    with pytest.raises(ValueError, match=message):
        load_llama(tiny_gguf, "tq3", "tq2", n_ctx=256, **kw)
    assert fake_llama_cpp.created == []


def test_chat_passes_the_split_to_load_llama(fake_llama_cpp, tiny_gguf):
    import io

    from turboquant_llama.chat import run_chat
    from turboquant_llama.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(tiny_gguf), "-ngl", "99", "-sm", "layer", "-ts", "2,1",
                                      "--threads", "1"])
    with pytest.raises(AttributeError, match="n_ctx"):   # the recording Llama stops the chat after its creation
        run_chat(args, stdin=io.StringIO(""), out=io.StringIO(), err=io.StringIO())
    (kw,) = fake_llama_cpp.created
    assert (kw["split_mode"], kw["tensor_split"]) == (101, [2.0, 1.0]) and "main_gpu" not in kw


def test_chat_refuses_in_the_command_lines_words(fake_llama_cpp, tiny_gguf, capfd):
    assert _main(["chat", "--model", str(tiny_gguf), "--split-mode", "layer"]) == 2
    assert "give --gpu-layers (-ngl) N" in capfd.readouterr().err and fake_llama_cpp.created == []


def test_niah_records_and_checks_the_split(tiny_gguf, capfd):
    from turboquant_llama import niah, switches
    from turboquant_llama.cli import build_parser
    from turboquant_llama.corpus import wikitext2_test_path

    args = build_parser().parse_args(["eval", "niah", "--model", "m", "-ngl", "8", "-sm", "layer", "-ts", "1,1"])
    command = niah._command(args, switches.from_env({}), wikitext2_test_path())
    assert "--gpu-layers 8 --split-mode layer --tensor-split 1,1" in command
    assert _main(["eval", "niah", "--model", str(tiny_gguf), "--split-mode", "layer"]) == 2
    assert "give --gpu-layers (-ngl) N" in capfd.readouterr().err


# --------------------------------------------------------------------------- the pinned llama-cpp-python

def test_llama_cpp_python_takes_these_arguments():
    """What load_llama forwards exists in the installed llama-cpp-python (read as text: importing it
    needs the built library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed (`tq install-python`)")
    root = Path(list(spec.submodule_search_locations)[0])
    signature = re.search(r"def __init__\(\s*self,(.*?)\):", (root / "llama.py").read_text(), re.S).group(1)
    for name in ("split_mode", "main_gpu", "tensor_split", "n_gpu_layers"):
        assert re.search(rf"\b{name}:", signature), name
    constants = (root / "llama_cpp.py").read_text()
    for mode in gpu_split.SPLIT_MODES:
        assert re.search(rf"^LLAMA_SPLIT_MODE_{mode.upper()} = \d+$", constants, re.M), mode
