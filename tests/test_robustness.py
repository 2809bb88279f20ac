"""No input crashes a `tq` command (issue 17, items 3, 5, 6 and 7): any bytes a child process
prints, a state of other cache types loaded into a context, pass-through arguments that would move
llama-server's listening address, long prompts and numbers out of range.

The tests without a model run fake llama-completion/llama-server programs (small Python scripts
that print chosen bytes or their own arguments) on a metadata-only GGUF; the others run SmolLM2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from .conftest import fake_program, free_port, require_build, require_llama_cpp, require_model, wait_healthy

TQ = [sys.executable, "-m", "turboquant_llama.cli"]
KV_LINE = ("0.00.434.150 I llama_kv_cache: size =    5.04 MiB (  1024 cells,  30 layers,  1/1 seqs), "
           "K (tq3):    2.95 MiB, V (tq2):    2.04 MiB\n")
LONG_PROMPT = "word " * 4000   # 20,000 characters, about 4,000 tokens


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TQ_CACHE_DIR", os.path.expanduser("~/.cache/turboquant-llama"))
    return env


@pytest.fixture(scope="module")
def smollm2():
    require_build()
    return require_model("smollm2")


def _main(argv: list[str]) -> int:
    from turboquant_llama.cli import main

    return main(argv)


# --------------------------------------------------------------------------- item 3: any bytes

def test_run_streams_bytes_cut_inside_a_character(tmp_path, tiny_gguf, monkeypatch, capfdbinary):
    """A child that stops inside a multi-byte character, on stdout and in its log: `tq run`
    passes the bytes through unchanged, as they come, and reports the KV memory."""
    from turboquant_llama import generate

    fake = fake_program(tmp_path / "llama-completion", f"""
        out = sys.stdout.buffer
        out.write(open(sys.argv[sys.argv.index("-f") + 1], "rb").read()[:-1])   # the prompt, as llama-completion echoes it
        out.write(b" \\xe6\\xb0")   # the first two bytes of a three-byte character
        out.flush()
        sys.stderr.buffer.write(b"D tokens: [ '\\xe6':23274, '\\x97':115 ]\\n" + {KV_LINE.encode()!r})
    """)
    monkeypatch.setattr(generate, "find_binary", lambda name, *a, **k: fake)
    assert _main(["run", "--model", str(tiny_gguf), "-p", "日本 is", "-n", "2"]) == 0
    captured = capfdbinary.readouterr()
    assert captured.out.startswith("日本 is".encode() + b" \xe6\xb0")
    assert b"KV cache tq3/tq2: 4.99 MiB" in captured.err and b"Traceback" not in captured.err
    text, mem = generate.run_completion(str(tiny_gguf), "日本 is", "tq3", "tq2", 2, 256, 1, 1, [])
    assert text == "日本 is \ufffd" and mem is not None and mem.k_mib == 2.95


def test_failing_child_error_is_short(tmp_path, tiny_gguf, monkeypatch):
    """A child that fails after logging an 80 KB line (llama.cpp's verbose log repeats the whole
    prompt and its tokens): the error quotes a bounded tail of the log, undecodable bytes replaced."""
    from turboquant_llama import generate
    from turboquant_llama.errors import UserError

    fake = fake_program(tmp_path / "llama-completion", """
        sys.stderr.buffer.write(b"D prompt: " + b"word \\xff" * 16000 + b"\\n")
        sys.stderr.buffer.write(b"E main: something broke\\n")
        sys.exit(1)
    """)
    monkeypatch.setattr(generate, "find_binary", lambda name, *a, **k: fake)
    with pytest.raises(UserError) as info:
        generate.run_completion(str(tiny_gguf), "x", "tq3", "tq2", 2, 256, 1, 1, [])
    msg = str(info.value)
    assert "exit 1" in msg and "something broke" in msg and "more characters]" in msg
    assert len(msg) < 2000


@pytest.mark.parametrize("prompt", ["日本", "Привет", "🙂"])
def test_run_non_latin_prompts(smollm2, prompt):
    r = subprocess.run(TQ + ["run", "--model", "smollm2", "-p", prompt, "-n", "4", "-t", "1", "-c", "256"],
                       capture_output=True, timeout=300, env=_env())
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err[-2000:]
    assert r.stdout.startswith(prompt.encode()), r.stdout[:200]
    assert "KV cache tq3/tq2:" in err and "Traceback" not in err


def test_run_ascii_prompt_cut_inside_a_character(smollm2):
    """SmolLM2 answers this prompt with a CJK character that takes two tokens: -n stops between
    them for some n, and `tq run` prints the cut bytes instead of failing."""
    prompt = "The Chinese character for water is"
    outputs = {}
    for n in (2, 3, 4):
        r = subprocess.run(TQ + ["run", "--model", "smollm2", "-p", prompt, "-n", str(n), "-t", "1", "-c", "256"],
                           capture_output=True, timeout=300, env=_env())
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        assert r.stdout.startswith(prompt.encode())
        outputs[n] = r.stdout
    cut = []
    for n, out in outputs.items():
        try:
            out.decode("utf-8")
        except UnicodeDecodeError:
            cut.append(n)
    assert cut, f"no output was cut inside a character, the test checks nothing: {outputs}"


# --------------------------------------------------------------------------- item 5: load_state

def test_state_error_message_names_types():
    from turboquant_llama.llama_python import state_error_message

    log = "state_read_data: the state holds a tq2 V cache, this context a f16 one (layer 3)\n"
    msg = state_error_message(log, ("f16", "f16"), ("tq3", "tq2"))
    assert "a tq3/tq2 KV cache and this context's is f16/f16" in msg
    assert "layer 3's values are tq2 in the state and f16 here" in msg
    assert "ctk='tq3', ctv='tq2'" in msg and "43" not in msg
    other = state_error_message("state_read_meta: failed to find available cells in kv cache\n", ("f16", "f16"), None)
    assert "failed to find available cells" in other


@pytest.fixture(scope="module")
def llama_pair(smollm2):
    require_llama_cpp()
    from turboquant_llama.llama_python import load_llama

    f16 = load_llama("smollm2", "f16", "f16", n_ctx=256, n_threads=1, n_batch=256)
    tq = load_llama("smollm2", "tq3", "tq2", n_ctx=256, n_threads=1, n_batch=256)
    yield f16, tq
    f16.close()
    tq.close()


@pytest.mark.parametrize("direction", ["tq into f16", "f16 into tq"])
def test_failed_state_load_keeps_the_context(llama_pair, direction):
    """A state of other cache types is refused with their names (verbose off), and the Llama keeps
    its token count and its next completion: before, it took the state's token count over an
    emptied cache and answered '-1000.' for ' Paris.'."""
    from turboquant_llama.llama_python import StateLoadError

    f16, tq = llama_pair
    into, source = (f16, tq) if direction == "tq into f16" else (tq, f16)
    prompt = "The capital of France is"
    expected = into.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"]
    n_tokens = into.n_tokens
    source.create_completion(prompt + " Paris. The capital of Italy is", max_tokens=4, temperature=0.0)
    state = source.save_state()
    assert state.n_tokens != n_tokens
    with pytest.raises(StateLoadError) as info:
        into.load_state(state)
    msg = str(info.value)
    src, dst = ("tq3/tq2", "f16/f16") if direction == "tq into f16" else ("f16/f16", "tq3/tq2")
    assert f"the state holds a {src} KV cache and this context's is {dst}" in msg, msg
    assert "q8_0" in msg   # the TQ cache's first layer
    assert isinstance(info.value, RuntimeError)   # what llama-cpp-python's load_state raised
    assert into.n_tokens == n_tokens
    assert into.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"] == expected
    # a state made without load_llama's save_state (no cache types recorded): llama.cpp's reason, in names
    del state.cache_types
    with pytest.raises(StateLoadError, match=r"layer 0's keys are (q8_0|f16) in the state and (f16|q8_0) here"):
        into.load_state(state)
    assert into.n_tokens == n_tokens
    assert into.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"] == expected
    # and a state it can take still loads
    same = into.save_state()
    into.reset()
    into.load_state(same)
    assert into.n_tokens == n_tokens


# --------------------------------------------------------------------------- item 6: bind address

@pytest.fixture()
def fake_server(tmp_path, monkeypatch):
    """llama-server replaced by a script that prints its arguments as JSON and exits."""
    from turboquant_llama import serve

    fake = fake_program(tmp_path / "llama-server", """
        print("ARGV " + json.dumps(sys.argv[1:]), flush=True)
    """)
    monkeypatch.setattr(serve, "find_binary", lambda name, *a, **k: fake)
    monkeypatch.delenv("AIP_MODE", raising=False)
    return fake


def _served(out: str) -> tuple[list[str], str]:
    argv = json.loads(next(line for line in out.splitlines() if line.startswith("ARGV "))[5:])
    serving = next(line for line in out.splitlines() if line.startswith("tq: serving"))
    return argv, serving


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


@pytest.mark.parametrize("extra", [
    ["--host", "192.0.2.1"], ["--host=0.0.0.0"], ["--host", "127.0.0.1"], ["--port", "9000"],
    ["-t", "1", "--host", "/tmp/tq-test.sock"],
])
def test_serve_refuses_bind_options_after_dashdash(fake_server, tiny_gguf, capfd, extra):
    code = _main(["serve", "--model", str(tiny_gguf), "--"] + extra)
    out, err = capfd.readouterr()
    assert code == 2
    assert "would change the address llama-server listens on" in err and "--allow-remote" in err
    assert "ARGV" not in out   # nothing was started


@pytest.mark.parametrize("extra,own", [(["-c", "100"], "--ctx"), (["--ctx_size", "100"], "--ctx"),
                                       (["-np", "8"], "--parallel"), (["-ctk", "f16"], "--ctk"),
                                       (["--model", "x.gguf"], "--model"), (["-ngl", "99"], "--gpu-layers")])
def test_serve_refuses_its_own_options_after_dashdash(fake_server, tiny_gguf, capfd, extra, own):
    assert _main(["serve", "--model", str(tiny_gguf), "--"] + extra) == 2
    out, err = capfd.readouterr()
    assert f"use tq serve's {own}" in err and "ARGV" not in out


@pytest.mark.parametrize("host", ["127.0.0.1,0.0.0.0", "localhost,192.0.2.1", "0.0.0.0"])
def test_serve_refuses_a_list_with_a_remote_address(fake_server, tiny_gguf, capfd, host):
    assert _main(["serve", "--model", str(tiny_gguf), "--host", host]) == 2
    out, err = capfd.readouterr()
    assert "not a loopback address" in err and "ARGV" not in out


def test_serve_prints_what_it_runs(fake_server, tiny_gguf, capfd):
    """With --allow-remote the address after -- replaces tq serve's: one --host and one --port
    reach llama-server, and the printed address is theirs."""
    assert _main(["serve", "--model", str(tiny_gguf), "--allow-remote", "--port", "8080", "--",
                  "--host", "127.0.0.1,::1", "--port", "9123", "--api-prefix", "/llm", "-t", "1"]) == 0
    argv, serving = _served(capfd.readouterr().out)
    assert _values(argv, "--host") == ["127.0.0.1,::1"] and _values(argv, "--port") == ["9123"]
    assert "http://127.0.0.1:9123/llm (OpenAI API: http://127.0.0.1:9123/llm/v1)" in serving
    assert "http://[::1]:9123/llm" in serving and "8080" not in serving
    assert argv[-2:] == ["-t", "1"]
    # a UNIX socket is local: no --allow-remote needed when tq serve's own --host names it
    assert _main(["serve", "--model", str(tiny_gguf), "--host", "/tmp/tq-test.sock"]) == 0
    argv, serving = _served(capfd.readouterr().out)
    assert _values(argv, "--host") == ["/tmp/tq-test.sock"] and "unix socket /tmp/tq-test.sock" in serving


def test_serve_refuses_aip_port_override(fake_server, tiny_gguf, capsys, monkeypatch):
    monkeypatch.setenv("AIP_MODE", "PREDICTION")
    monkeypatch.setenv("AIP_HTTP_PORT", "9999")
    assert _main(["serve", "--model", str(tiny_gguf)]) == 2
    assert "AIP_HTTP_PORT (9999) instead of --port 8080" in capsys.readouterr().err


def test_serve_listens_where_it_says(smollm2, tmp_path):
    """The real llama-server, on loopback: a port given after -- (with --allow-remote) is the one
    it listens on and the one printed; tq serve's own --port is not used."""
    from turboquant_llama.build import find_binary

    find_binary("llama-server")
    port, unused = free_port(), free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(TQ + ["serve", "--model", "smollm2", "--ctx", "512", "--parallel", "1", "--port", str(unused),
                                  "--allow-remote", "--", "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                                  "--no-webui"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=_env())
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", tmp_path / "server.log")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{unused}/health", timeout=2)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert f"http://127.0.0.1:{port} " in out and str(unused) not in out
        cmd_line = next(l for l in (tmp_path / "server.log").read_text().splitlines() if l.startswith("tq: /"))
        assert cmd_line.count("--port") == 1 and cmd_line.count("--host") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# --------------------------------------------------------------------------- item 7: numbers, long input

@pytest.mark.parametrize("argv,needle", [
    (["run", "--ctx", "-5"], "--ctx/-c: -5 is out of range"),
    (["run", "--ctx", "0"], "--ctx/-c: 0 is out of range"),
    (["run", "-c", "abc"], "'abc' is not a context size"),
    (["run", "-c", "1.5"], "'1.5' is not a context size"),
    (["run", "-n", "0"], "--n-predict/-n: 0 is out of range"),
    (["run", "-n", "-2"], "-2 is out of range: a token count at least 1 (or -1)"),
    (["run", "-t", "0"], "--threads/-t: 0 is out of range"),
    (["run", "--seed", "-5"], "--seed: -5 is out of range"),
    (["run", "--seed", str(2**32)], "is out of range: a seed"),
    (["serve", "--port", "0"], "--port: 0 is out of range: a TCP port from 1 to 65535"),
    (["serve", "--port", "65536"], "65536 is out of range"),
    (["serve", "--port", "http"], "'http' is not a TCP port"),
    (["serve", "--parallel", "0"], "--parallel/-np: 0 is out of range"),
    (["serve", "--ctx", "-5"], "--ctx/-c: -5 is out of range"),
    (["serve", "--gpu-layers", "-3"], "-3 is out of range"),
    (["chat", "--ctx", "0"], "--ctx/-c: 0 is out of range"),
    (["chat", "--max-tokens", "0"], "--max-tokens/-n: 0 is out of range"),
    (["chat", "--temp", "-1"], "--temp: -1 is out of range"),
    (["chat", "--temp", "nan"], "--temp: nan is out of range"),
    (["chat", "--threads", "-1"], "--threads/-t: -1 is out of range"),
    (["python-agreement", "--n-tokens", "0"], "--n-tokens: 0 is out of range"),
])
def test_numbers_out_of_range_are_refused(capsys, argv, needle):
    from turboquant_llama.cli import build_parser

    with pytest.raises(SystemExit) as info:   # parsing only: nothing runs, whatever the parser lets through
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_numbers_in_range_parse():
    from turboquant_llama.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["run", "-n", "-1", "--seed", "-1", "-c", "256", "-t", "2"])
    assert (a.n_predict, a.seed, a.ctx, a.threads) == (-1, -1, 256, 2)
    a = parser.parse_args(["serve", "--port", "65535", "--parallel", "1", "--gpu-layers", "0"])
    assert (a.port, a.parallel, a.gpu_layers) == (65535, 1, 0)
    a = parser.parse_args(["chat", "--temp", "0", "-ngl", "-1"])
    assert (a.temp, a.gpu_layers) == (0.0, -1)


def test_long_prompt_error_is_short(smollm2):
    r = subprocess.run(TQ + ["run", "--model", "smollm2", "-p", LONG_PROMPT, "--ctx", "256", "-n", "2", "-t", "1"],
                       capture_output=True, timeout=300, env=_env())
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, err[-2000:]
    assert "the context holds 252" in err and "raise --ctx or shorten the prompt" in err
    assert len(r.stdout) + len(r.stderr) < 1000, err[:2000]


def test_chat_survives_long_and_undecodable_input(smollm2):
    """tq chat on piped bytes: a line that is not UTF-8 and a 20,000-character line with a
    256-token context; the session goes on and the errors are one short line."""
    require_llama_cpp()
    data = b"caf\xe9 \xff\xfe?\n" + LONG_PROMPT.encode() + b"\nHi\n"
    r = subprocess.run(TQ + ["chat", "--model", "smollm2", "--ctx", "256", "--temp", "0", "--max-tokens", "4",
                             "--threads", "1"], input=data, capture_output=True, timeout=300, env=_env())
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert err.count("[KV tq3/tq2:") == 2   # the first and the last line were answered
    assert "[error:" in err and len(err) < 2000, err[:3000]
