"""`tq eval niah`: prompt construction (needle at the requested depth, prompt sized to the target
length, deterministic for a seed), recall aggregation, argument validation, and one short
end-to-end run (f16 and tq4, 512 tokens, two depths) through the command line."""

from __future__ import annotations

import json
import random
import re

import pytest

from turboquant_llama import niah, niah_prompt, niah_results
from turboquant_llama.cache_types import parse_type_specs
from turboquant_llama.corpus import wikitext2_test_path
from turboquant_llama.errors import UserError

from .conftest import require_llama_cpp, require_model

_WORDS = ("river", "castle", "album", "season", "village", "army", "ship", "species", "church", "election",
          "railway", "novel", "battle", "temple", "harbour", "bridge", "festival", "museum", "county", "team")


def _fake_tokenize(text: str, add_bos: bool) -> list[int]:
    """Words, punctuation and the fake template's markers as tokens; long words split in two."""
    toks: list[int] = [1] if add_bos else []
    for piece in re.findall(r"<\|\w+\|>|\w+|[^\w\s]|\n", text):
        toks += [hash(piece) & 0xFFFF] * (2 if len(piece) > 8 else 1)
    return toks


def _fake_render(user: str) -> str:
    return f"<|system|>\nYou are helpful.\n<|user|>\n{user}\n<|assistant|>\n"


CHAT = niah_prompt.PromptFormat(_fake_tokenize, _fake_render, add_bos=False, name="chat template")
PLAIN = niah_prompt.PromptFormat(_fake_tokenize, None, add_bos=True)


@pytest.fixture(scope="module")
def filler(tmp_path_factory) -> list[str]:
    """WikiText-like raw text: headings, blank lines, " @-@ " and " , " spacing."""
    rng = random.Random(7)
    out = []
    for h in range(40):
        out += ["", f" = Heading {h} = ", ""]
        for _ in range(3):
            sentences = []
            for _ in range(rng.randint(2, 7)):
                ws = [rng.choice(_WORDS) for _ in range(rng.randint(6, 24))]
                ws[0] = ws[0].capitalize()
                ws.insert(rng.randint(1, len(ws) - 1), ",")
                sentences.append(" ".join(ws) + " .")
            out.append(" " + " ".join(sentences) + " ")
    path = tmp_path_factory.mktemp("filler") / "wiki.test.raw"
    path.write_text("\n".join(out) + "\n")
    return niah_prompt.load_filler(path)


# --- arguments ---------------------------------------------------------------------------------------


def test_parse_lengths_and_depths():
    assert niah.parse_lengths("1k, 2K,512,1.5k,1k") == [1024, 2048, 512, 1536]
    assert niah.parse_depths("0,0.25,50%,1.0,0") == [0.0, 0.25, 0.5, 1.0]
    for bad in ("", "abc", "10", "1.3333k"):
        with pytest.raises(UserError):
            niah.parse_lengths(bad)
    for bad in ("", "1.5", "-0.1", "x"):
        with pytest.raises(UserError):
            niah.parse_depths(bad)
    assert [niah_results.fmt_length(n) for n in (512, 1024, 1536, 4096, 1000)] == ["512", "1k", "1.5k", "4k", "1000"]


def test_parse_pairs_validates_type_names():
    assert parse_type_specs("f16,q4_0,tq4,tq3/tq2,TQ4") == [("f16", "f16"), ("q4_0", "q4_0"), ("tq4", "tq4"),
                                                             ("tq3", "tq2")]
    with pytest.raises(UserError, match="unknown cache type 'tq5'.*valid types:.*tq3"):
        parse_type_specs("f16,tq5")
    with pytest.raises(UserError, match="bad cache type spec"):
        parse_type_specs("tq3/tq2/tq2")
    with pytest.raises(UserError):
        parse_type_specs(" , ")


def test_clean_wikitext():
    assert niah_prompt.clean_wikitext(" A well @-@ known ship , built in 1 @,@ 200 ( or so ) . ") == \
        "A well-known ship, built in 1,200 (or so)."


# --- prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [CHAT, PLAIN], ids=["chat", "plain"])
@pytest.mark.parametrize("length", [300, 1024, 2048])
def test_prompt_length_close_to_target(filler, fmt, length):
    for depth in (0.0, 0.5, 1.0):
        p = niah_prompt.build_prompt(fmt, filler, length, depth, seed=3)
        assert p.n_tokens == len(p.tokens) == len(fmt.tokens(niah_prompt.user_message(p.haystack, p.key),
                                                                niah_prompt.ANSWER_PREFIX.format(key=p.key)))
        # trimmed word by word: at most a word (two fake tokens here) plus a comma short
        assert length - 4 <= p.n_tokens <= length, (length, depth, p.n_tokens)
        assert p.text.endswith(niah_prompt.ANSWER_PREFIX.format(key=p.key))
        assert niah_prompt.QUESTION.format(key=p.key) in p.text


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_at_depth_on_a_sentence_boundary(filler, depth):
    p = niah_prompt.build_prompt(CHAT, filler, 2048, depth, seed=1)
    needle = niah_prompt.NEEDLE.format(key=p.key, number=p.number)
    assert p.haystack.count(needle) == 1 and p.haystack.count(p.number) == 1
    at = p.haystack.index(needle)
    assert at == p.needle_char
    rest = len(p.haystack) - len(needle) - 1          # haystack characters without the needle
    assert abs(at / rest - depth) < 0.03                # snapped to the nearest sentence (~150 chars)
    assert abs(p.depth_actual - depth) < 0.03
    before = p.haystack[:at]
    if depth == 0.0:
        assert at == 0
    elif depth == 1.0:
        assert p.haystack.endswith(needle)
    else:
        assert before.endswith((". ", ".\n")), before[-40:]
    if at:
        assert before[-1] in " \n"
    assert p.haystack[at + len(needle):][:1] in ("", " ")


def test_prompt_deterministic_with_seed(filler):
    a = niah_prompt.build_prompt(CHAT, filler, 1024, 0.5, seed=11)
    b = niah_prompt.build_prompt(CHAT, filler, 1024, 0.5, seed=11)
    assert (a.text, a.tokens, a.number, a.key, a.offset) == (b.text, b.tokens, b.number, b.key, b.offset)
    c = niah_prompt.build_prompt(CHAT, filler, 1024, 0.5, seed=12)
    assert c.text != a.text
    d = niah_prompt.build_prompt(CHAT, filler, 1024, 0.5, seed=11, trial=1)
    assert d.text != a.text
    assert 100_000 <= int(a.number) <= 9_999_999 and a.key in niah_prompt.CITIES


def test_prompt_too_short_is_an_error(filler):
    with pytest.raises(UserError, match="too short"):
        niah_prompt.build_prompt(CHAT, filler, 64, 0.5)


def test_insert_needle_edges():
    words = [("One", " "), ("two.", " "), ("Three", " "), ("four.", "\n"), ("Five", " "), ("six.", "\n")]
    text, at, actual = niah_prompt.insert_needle(words, 0.0, "N.")
    assert text.startswith("N. One") and at == 0 and actual == 0
    text, at, actual = niah_prompt.insert_needle(words, 1.0, "N.")
    assert text.endswith("six. N.") and actual == 1.0
    text, at, _ = niah_prompt.insert_needle(words, 0.6, "N.")
    assert text == "One two. Three four.\nN. Five six." and at == text.index("N.")
    text, at, _ = niah_prompt.insert_needle(words, 0.3, "N.")
    assert text == "One two. N. Three four.\nFive six."


def test_real_filler_prompt():
    lines = niah_prompt.load_filler(wikitext2_test_path())
    assert not any(l.startswith("=") and l.endswith("=") for l in lines) and " @-@ " not in "".join(lines[:200])
    p = niah_prompt.build_prompt(CHAT, lines, 4096, 0.25, seed=0)
    assert 4096 - 4 <= p.n_tokens <= 4096
    assert lines[p.offset].split()[-1] in p.haystack


def test_is_found():
    assert niah_prompt.is_found(" 4821937.", "4821937")
    assert niah_prompt.is_found("The number is 4,821,937", "4821937")
    assert niah_prompt.is_found("4821937", "4821937")
    assert not niah_prompt.is_found("48219370", "4821937")
    assert not niah_prompt.is_found("14821937", "4821937")
    assert not niah_prompt.is_found("482193", "4821937")
    assert not niah_prompt.is_found("", "4821937")


# --- aggregation -------------------------------------------------------------------------------------


def _case(k, v, length, depth, found):
    return {"k": k, "v": v, "length": length, "depth": depth, "found": found, "answer": ""}


def test_recall_aggregation():
    cases = [_case("f16", "f16", 1024, 0.0, True), _case("f16", "f16", 1024, 1.0, True),
             _case("f16", "f16", 2048, 0.0, True), _case("f16", "f16", 2048, 1.0, False),
             _case("tq3", "tq2", 1024, 0.0, False), _case("tq3", "tq2", 1024, 1.0, True),
             _case("tq3", "tq2", 1024, 1.0, True),   # a second needle in that cell
             _case("tq3", "tq2", 2048, 0.0, False)]
    assert niah_results.recall(cases) == {"f16/f16": 0.75, "tq3/tq2": 0.5}
    assert list(niah_results.recall(cases)) == ["f16/f16", "tq3/tq2"]
    assert niah_results.recall_grid(cases, "f16", "f16", [1024, 2048], [0.0, 1.0]) == [[1.0, 1.0], [1.0, 0.0]]
    assert niah_results.recall_grid(cases, "tq3", "tq2", [1024, 2048, 4096], [0.0, 1.0]) == \
        [[0.0, 0.0, None], [1.0, None, None]]
    assert niah_results.recall_by_length(cases) == {"f16/f16": {"1k": 1.0, "2k": 0.5}, "tq3/tq2": {"1k": 2 / 3, "2k": 0.0}}
    assert niah_results.recall([]) == {}


def _run(cases: list[dict], protect: int = 1, needle: str = "N {key} {number}") -> dict:
    return {"command": "tq eval niah ...", "model_file": "m.gguf", "seed": 0, "seconds": 1.0, "cases": cases,
            "settings": {"pairs": sorted({niah_results.pair_key(c["k"], c["v"]) for c in cases}),
                         "lengths": sorted({c["length"] for c in cases}), "lengths_run": sorted({c["length"] for c in cases}),
                         "depths": sorted({c["depth"] for c in cases}), "needle": needle, "protect_layers": protect}}


def test_append_merges_runs():
    first = _run([_case("f16", "f16", 1024, 0.0, True), _case("tq3", "tq2", 1024, 0.0, False)])
    second = _run([_case("tq3", "tq2", 1024, 0.0, True), _case("tq3", "tq2", 4096, 0.5, False)])
    merged = niah_results.merge_runs(first, second)
    assert len(merged["cases"]) == 3                      # the tq3/tq2 1k depth-0 case was replaced
    assert merged["recall"] == {"f16/f16": 1.0, "tq3/tq2": 0.5}
    assert merged["settings"]["lengths_run"] == [1024, 4096] and merged["settings"]["depths"] == [0.0, 0.5]
    assert merged["settings"]["pairs"] == ["f16/f16", "tq3/tq2"]
    assert merged["commands"] == ["tq eval niah ...", "tq eval niah ..."] and merged["seconds"] == 2.0
    with pytest.raises(UserError, match="protect_layers"):
        niah_results.merge_runs(first, _run(second["cases"], protect=0))
    with pytest.raises(UserError, match="needle"):
        niah_results.merge_runs(first, _run(second["cases"], needle="other {key} {number}"))


def _name(label: str, protect: int = 1, key_center: bool = True, exact_sink: bool = True) -> str:
    return niah_results.results_name(label, {"protect_layers": protect, "key_center": key_center,
                                             "exact_sink": exact_sink})


def test_results_name_marks_non_default_protection():
    assert _name("qwen2.5-coder-0.5b", 1) == "qwen2.5-coder-0.5b"
    assert _name("qwen2.5-coder-0.5b", 0) == "qwen2.5-coder-0.5b-protect_layers_0"
    assert _name("my model/x", 2) == "my_model_x-protect_layers_2"
    assert _name("smollm2", 1, key_center=False) == "smollm2-key_center_off"
    assert _name("smollm2", 0, key_center=False) == "smollm2-protect_layers_0-key_center_off"
    assert _name("smollm2", 1, exact_sink=False) == "smollm2-exact_sink_off"
    assert _name("smollm2", 1, False, False) == "smollm2-key_center_off-exact_sink_off"


def test_heatmap_renders(tmp_path):
    cases = [_case(k, v, n, d, (n + int(d * 4)) % 3 != 0) for k, v in (("f16", "f16"), ("tq3", "tq2"))
             for n in (1024, 2048) for d in (0.0, 0.5, 1.0)]
    data = {"seed": 0, "n_ctx_train": 8192, "skipped_lengths": [16384], "recall": niah_results.recall(cases), "cases": cases,
            "settings": {"pairs": ["f16/f16", "tq3/tq2"], "lengths_run": [1024, 2048], "depths": [0.0, 0.5, 1.0],
                         "needles": 1, "prompt_format": "chat template"}}
    path = tmp_path / "niah.png"
    niah_results.render_heatmaps("m", data, path)
    assert path.stat().st_size > 1000


def test_cli_errors(tmp_path, capsys):
    from turboquant_llama.cli import main

    assert main(["eval", "niah", "--model", "smollm2", "--types", "f16,tq9"]) == 2
    assert "unknown cache type 'tq9'" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_unsupported_head_size(tmp_path, capsys):
    from turboquant_llama.cli import main

    from .gguf_files import write_tiny_llama

    model = write_tiny_llama(tmp_path / "m.gguf", 80)
    assert main(["eval", "niah", "--model", str(model), "--types", "f16,tq3"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve head size 80" in err and "multiple of 64" in err


# --- with the built library and SmolLM2 ----------------------------------------------------------------


def _require_llama_cpp():
    require_model("smollm2")
    return require_llama_cpp()


def test_model_tokenizer_prompt_length():
    _require_llama_cpp()
    tok = niah_prompt.VocabTokenizer(require_model("smollm2"))
    try:
        fmt = tok.prompt_format()
        assert fmt.name == "chat template"
        lines = niah_prompt.load_filler(wikitext2_test_path())
        for length, depth in ((512, 0.0), (1024, 0.5), (2048, 1.0)):
            p = niah_prompt.build_prompt(fmt, lines, length, depth, seed=0)
            assert length - 4 <= p.n_tokens <= length
            assert p.text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in p.text
            assert p.tokens == tok.tokenize(p.text, False)
    finally:
        tok.close()


def test_end_to_end_json(tmp_path, capsys, monkeypatch):
    _require_llama_cpp()
    monkeypatch.delenv("TQ_CORPUS", raising=False)   # the packaged WikiText-2 test text
    from turboquant_llama.cli import main

    rc = main(["eval", "niah", "--model", "smollm2", "--types", "f16,tq4", "--lengths", "512", "--depths", "0,1",
               "--threads", "1", "--out-dir", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert set(out) == {"recall", "cases"}
    assert set(out["recall"]) == {"f16/f16", "tq4/tq4"}
    assert all(0.0 <= r <= 1.0 for r in out["recall"].values())
    assert len(out["cases"]) == 4
    for c in out["cases"]:
        assert set(c) == {"k", "v", "length", "depth", "found", "answer"}
        assert c["length"] == 512 and c["depth"] in (0.0, 1.0) and isinstance(c["found"], bool)
        assert isinstance(c["answer"], str)
    assert {(c["k"], c["v"]) for c in out["cases"]} == {("f16", "f16"), ("tq4", "tq4")}
    data = json.loads((tmp_path / "niah-smollm2.json").read_text())
    assert data["model"] == "smollm2" and data["seed"] == 0 and data["command"].startswith("tq eval niah")
    assert data["settings"]["lengths_run"] == [512] and data["n_ctx_train"] == 8192
    assert all(509 <= c["n_prompt_tokens"] <= 512 for c in data["cases"])
    assert data["settings"]["filler"] == "wiki.test.raw" and data["switches"]["key_center"] == "on"
    assert (tmp_path / "niah-smollm2.png").stat().st_size > 1000
    assert "| f16/f16 |" in (tmp_path / "niah-smollm2.md").read_text()


# --- the whole run, with a stand-in model -----------------------------------------------------------------


_VOCAB: dict[str, int] = {}


def _word_tokenize(text: str, add_bos: bool) -> list[int]:
    """Words, numbers and punctuation as tokens of a vocabulary that grows as it meets them."""
    pieces = re.findall(r"\w+|[^\w\s]|\n", text)
    return ([1] if add_bos else []) + [_VOCAB.setdefault(p, len(_VOCAB) + 2) for p in pieces]


def _detokenize(tokens: list[int]) -> str:
    words = {i: p for p, i in _VOCAB.items()}
    return " ".join(words[t] for t in tokens if t in words)


class _FakeVocab:
    """The model's vocabulary: words (the stand-in model reads its prompt back)."""

    def __init__(self, path):
        pass

    def prompt_format(self):
        return niah_prompt.PromptFormat(_word_tokenize, None, add_bos=True, name="plain (no chat template)")

    def close(self):
        pass


class _FakeLlama:
    """Answers the needle's number when its K type is f16, a wrong number otherwise, and records
    the TQ cache options it was created with."""

    created: list[dict] = []

    def __init__(self, ctk: str, kwargs: dict):
        self.ctk = ctk
        _FakeLlama.created.append({"ctk": ctk, "n_ctx": kwargs["n_ctx"], "key_center": kwargs.get("tq_key_center"),
                                   "extra": sorted(k for k in kwargs if k.startswith("tq_"))})

    def create_completion(self, prompt, **kw):
        number = re.search(r"magic number for [A-Za-z ]+ is (\d+) \.", _detokenize(prompt)).group(1)
        return {"choices": [{"text": f" {number}." if self.ctk == "f16" else " 12."}]}

    def close(self):
        pass


def test_run_with_a_stand_in_model(tmp_path, monkeypatch, filler, capsys):
    from turboquant_llama import llama_python
    from turboquant_llama.cli import main

    from .gguf_files import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf", 64)   # n_ctx_train 256
    text = tmp_path / "filler.raw"
    text.write_text("\n".join(filler) + "\n")
    monkeypatch.setattr(niah, "VocabTokenizer", _FakeVocab)
    monkeypatch.setattr(llama_python, "load_llama", lambda path, k, v, **kw: _FakeLlama(k, kw))
    _FakeLlama.created = []
    argv = ["eval", "niah", "--model", str(model), "--types", "f16,tq3/tq2", "--lengths", "200,256,512",
            "--depths", "0,1", "--filler", str(text), "--out-dir", str(tmp_path), "--tq-key-center", "off", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recall"] == {"f16/f16": 1.0, "tq3/tq2": 0.0}
    assert len(out["cases"]) == 2 * 2 * 2                  # 512 is above n_ctx_train: skipped
    assert [c["n_ctx"] for c in _FakeLlama.created] == [264, 320, 264, 320]
    assert all(c["key_center"] is False for c in _FakeLlama.created)
    assert all(c["extra"] == ["tq_exact_sink", "tq_key_center", "tq_protect_layers"] for c in _FakeLlama.created)
    stem = tmp_path / "niah-tiny-key_center_off"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["command"].endswith("--json --tq-key-center off") and f"--filler {text}" in data["command"]
    assert data["switches"]["key_center"] == "off" and data["settings"]["key_center"] == "off"
    assert data["skipped_lengths"] == [512] and data["settings"]["lengths_run"] == [200, 256]
    assert "| tq3/tq2 | 0.00 |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 1000
    # --append adds the cases of a second run to the file
    assert main(argv[:5] + ["f16,q8_0"] + argv[6:] + ["--append"]) == 0
    capsys.readouterr()
    merged = json.loads(stem.with_suffix(".json").read_text())
    assert merged["recall"] == {"f16/f16": 1.0, "tq3/tq2": 0.0, "q8_0/q8_0": 0.0}
    assert len(merged["commands"]) == 2
