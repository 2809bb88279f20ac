"""llama-cpp-python 0.3.36 on the patched library: TQ caches from Python (load_llama), greedy
determinism, agreement with the f16 cache, state save/restore, validation of type names and head
sizes before llama.cpp sees them, and streaming chat completions.

Floors for agreement come from results/llama-python-agreement.json (`tq python-agreement`, 8
prompts, first 8 greedy tokens, 1 thread): tq4/tq4 1/8 prompts identical, 6/8 first tokens, mean
common prefix 4.12 tokens; tq3/tq3 1/8, 5/8, 2.25; tq3/tq2 1/8, 6/8, 3.38; tq2/tq2 0/8, 3/8, 0.50
(q8_0 7/8, 8/8, 7.62 and rotated q4_0 4/8, 7/8, 5.50 for reference). The floors sit slightly
below these numbers.
"""

from __future__ import annotations


import pytest

from .conftest import require_llama_cpp, require_model

PAIRS = [("tq3", "tq2"), ("tq4", "tq4"), ("tq3", "tq3"), ("tq2", "tq2")]
N_TOKENS = 8
N_CTX = 256
# (identical first-8 fraction, first-token fraction, mean common prefix) over the 24 prompts:
# results/llama-python-agreement.json less two prompts (2/24) and 0.75 tokens, room for the float
# differences between SIMD levels (AVX2 on CI, AVX-512 elsewhere) that can flip a near tie
FLOORS = {
    "tq4/tq4": (0.33, 0.75, 3.8),
    "tq3/tq3": (0.0, 0.62, 1.75),
    "tq3/tq2": (0.0, 0.58, 1.4),
    "tq2/tq2": (0.0, 0.33, 0.0),
    "q8_0/q8_0": (0.66, 0.83, 5.85),   # sanity check of the harness itself
}


def _require_llama_cpp():
    require_model("smollm2")
    return require_llama_cpp()


@pytest.fixture(scope="module")
def llms():
    """Loaded models, one per K/V pair, shared by the tests of this module."""
    _require_llama_cpp()
    from turboquant_llama.llama_python import load_llama

    cache = {}

    def get(ctk: str, ctv: str):
        if (ctk, ctv) not in cache:
            cache[(ctk, ctv)] = load_llama("smollm2", ctk, ctv, n_ctx=N_CTX, n_threads=1, n_batch=N_CTX)
        return cache[(ctk, ctv)]

    yield get
    for llm in cache.values():
        llm.close()


@pytest.fixture(scope="module")
def reference(llms):
    from turboquant_llama.llama_python import AGREEMENT_PROMPTS, greedy_tokens

    llm = llms("f16", "f16")
    return [greedy_tokens(llm, p, N_TOKENS) for p in AGREEMENT_PROMPTS]


def test_type_constants():
    from turboquant_llama import llama_python as lp

    assert (lp.TQ2, lp.TQ3, lp.TQ4, lp.TQ2_QJL, lp.TQ3_QJL, lp.TQ4_QJL) == (43, 44, 45, 46, 47, 48)
    assert lp.CACHE_TYPE_IDS["f16"] == 1 and lp.CACHE_TYPE_IDS["q8_0"] == 8 and lp.CACHE_TYPE_IDS["tq3"] == 44
    assert lp.cache_type_id("TQ3") == 44


def test_wrong_type_name_raises_before_llama_cpp():
    from turboquant_llama.llama_python import cache_type_id, load_llama

    with pytest.raises(ValueError, match=r"unknown KV cache type 'tq5'; valid: .*q8_0.*tq3.*tq2_qjl"):
        cache_type_id("tq5")
    # no model is opened and llama.cpp is not called: the name is checked first
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        load_llama("no-such-model.gguf", ctk="tq3", ctv="q3_k")


@pytest.mark.parametrize("head", [80, 96])
def test_head_size_check(head):
    from turboquant_llama.llama_python import check_head_size

    with pytest.raises(ValueError) as info:
        check_head_size("tq3", "tq2", head)
    msg = str(info.value)
    assert f"head size {head}" in msg and "multiple of 64" in msg and "f16" in msg
    if head == 96:   # blocks of 32 divide 96: llama.cpp's own quantized types can serve it
        assert "q8_0" in msg and "q4_0" in msg
        check_head_size("q8_0", "q4_0", head)
    else:            # 80 is not a multiple of 32 either: only unquantized types
        assert "q8_0" not in msg
        with pytest.raises(ValueError, match="head size 80"):
            check_head_size("q8_0", "f16", head)
    check_head_size("f16", "f16", head)
    with pytest.raises(ValueError, match=f"V cache type tq4 cannot serve head size {head}"):
        check_head_size("f16", "tq4", head)
    check_head_size("tq4", "tq2", [64, 128, 256])


def test_head_size_check_reads_gguf_before_llama_cpp(tmp_path):
    """A GGUF whose metadata says head size 80 (no tensors: llama.cpp could not even load it) is
    refused by load_llama with the head size and the types that serve it."""
    gguf = pytest.importorskip("gguf")
    from turboquant_llama.llama_python import head_sizes, load_llama

    path = tmp_path / "head80.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(640)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_context_length(2048)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert head_sizes(path) == ([80, 80], [80, 80])
    with pytest.raises(ValueError, match=r"K cache type tq3 cannot serve head size 80.*use f32, f16, bf16"):
        load_llama(path, "tq3", "tq2")


@pytest.mark.parametrize("ctk,ctv", PAIRS)
def test_greedy_is_deterministic(llms, ctk, ctv):
    from turboquant_llama.llama_python import AGREEMENT_PROMPTS, greedy_tokens

    llm = llms(ctk, ctv)
    for prompt in AGREEMENT_PROMPTS[:2]:
        first = greedy_tokens(llm, prompt, N_TOKENS)
        assert len(first) == N_TOKENS
        assert greedy_tokens(llm, prompt, N_TOKENS) == first


@pytest.mark.parametrize("ctk,ctv", PAIRS + [("q8_0", "q8_0")])
def test_agreement_with_f16(llms, reference, ctk, ctv):
    from turboquant_llama.llama_python import AGREEMENT_PROMPTS, agreement, greedy_tokens

    llm = llms(ctk, ctv)
    got = [greedy_tokens(llm, p, N_TOKENS) for p in AGREEMENT_PROMPTS]
    r = agreement(reference, got, N_TOKENS)
    identical, first, prefix = FLOORS[f"{ctk}/{ctv}"]
    assert r["identical_fraction"] >= identical, r
    assert r["first_token_fraction"] >= first, r
    assert r["mean_common_prefix"] >= prefix, r


@pytest.mark.parametrize("ctk,ctv", PAIRS)
def test_state_save_restore(llms, ctk, ctv):
    """Continuing after load_state gives the tokens it gave right after save_state, also after the
    context was overwritten in between, and in a second Llama with the same cache types."""
    from turboquant_llama.llama_python import load_llama

    llm = llms(ctk, ctv)
    toks = llm.tokenize(b"The three primary colors are")

    def cont(model) -> list[int]:
        out = []
        for t in model.generate(toks[-1:], top_k=1, temp=0.0, reset=False):
            out.append(t)
            if len(out) == N_TOKENS:
                break
        return out

    llm.reset()
    llm.eval(toks[:-1])
    state = llm.save_state()
    direct = cont(llm)
    llm.reset()
    llm.eval(llm.tokenize(b"Something else entirely, to overwrite the cache cells."))
    llm.load_state(state)
    assert cont(llm) == direct
    other = load_llama("smollm2", ctk, ctv, n_ctx=N_CTX, n_threads=1, n_batch=N_CTX)
    try:
        other.load_state(state)
        assert cont(other) == direct
    finally:
        other.close()


def test_chat_completion_streams(llms):
    llm = llms("tq3", "tq2")
    chunks = list(llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                             stream=True, max_tokens=12, temperature=0.0))
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert sum(1 for t in texts if t) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "Paris" in "".join(t for t in texts if t)


def test_llama_direct_with_type_ids():
    """The plain llama-cpp-python API takes the raw ids (after import_llama_cpp set the library)."""
    _require_llama_cpp()
    from turboquant_llama.llama_python import TQ2, TQ3, import_llama_cpp
    from turboquant_llama.models import model_path

    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(model_path("smollm2")), flash_attn=True, type_k=TQ3, type_v=TQ2, n_ctx=N_CTX,
                          n_threads=1, n_threads_batch=1, verbose=False)
    try:
        out = llm("The capital of Germany is", max_tokens=4, temperature=0.0)
        assert "Berlin" in out["choices"][0]["text"]
        assert (llm.context_params.type_k, llm.context_params.type_v) == (TQ3, TQ2)
    finally:
        llm.close()
