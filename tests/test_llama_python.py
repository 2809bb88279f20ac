"""llama-cpp-python 0.3.36 on the patched library: TQ caches from Python (load_llama), greedy
determinism, agreement with the f16 cache, state save/restore, validation of type names and head
sizes before llama.cpp sees them, and streaming chat completions.

Floors for agreement come from two machines' `tq python-agreement` (24 prompts, first 8 greedy
tokens, 1 thread, keys centred on the model's calibrated mean keys, exact sink):
results/llama-python-agreement.json (tq4/tq4 14/24 prompts identical, 22/24 first tokens, mean common
prefix 5.83 tokens; tq3/tq3 5/24, 22/24, 4.42; tq3/tq2 3/24, 17/24, 2.92; tq2/tq2 2/24, 17/24, 2.67) and
results/llama-python-agreement-epyc-avx2.json, an AMD EPYC with AVX2 only (tq4/tq4 10/24, 20/24, 5.12;
tq3/tq3 4/24, 18/24, 3.58; tq3/tq2 2/24, 17/24, 3.17; tq2/tq2 0/24, 14/24, 1.75). ggml's CPU kernels
are built for the host's instruction set, so the f16 reference and the TQ runs round differently from
one CPU to another, and a greedy choice near a tie flips: on the same code the two machines differ by
up to four prompts. The floors sit two prompts and 0.75 tokens below the lower of the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import require_llama_cpp, require_model

PAIRS = [("tq3", "tq2"), ("tq4", "tq4"), ("tq3", "tq3"), ("tq2", "tq2")]
N_TOKENS = 8
N_CTX = 256
# (identical first-8 fraction, first-token fraction, mean common prefix) over the 24 prompts: the
# lower of the two machines' results (docstring) less two prompts (2/24) and 0.75 tokens, room for
# the float differences between CPUs and SIMD levels that can flip a near tie
FLOORS = {
    "tq4/tq4": (0.33, 0.75, 4.37),
    "tq3/tq3": (0.08, 0.66, 2.83),
    "tq3/tq2": (0.0, 0.62, 2.17),
    "tq2/tq2": (0.0, 0.50, 1.00),
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
    from turboquant_llama.llama_python import head_sizes, load_llama

    from .gguf_files import write_metadata_gguf

    path = write_metadata_gguf(tmp_path / "head80.gguf", "llama", 2, 640, 8, 2, context_length=2048)
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
    # the stream carries the greedy answer itself (SmolLM2-135M's answer is no fact to check:
    # with the f16 cache it does not say Paris either)
    whole = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=12, temperature=0.0)
    assert "".join(t for t in texts if t) == whole["choices"][0]["message"]["content"]


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


# --------------------------------------------------------------------------- key centering

CENTER_TEXT_OFFSET = 5000   # a WikiText-2 passage: natural text, several ubatches
CENTER_TOKENS = 384


def _passage_logprobs(ctk: str, ctv: str, center: str, sink: str = "1"):
    """Log-probabilities of every position of a 384-token passage, evaluated in three 128-token
    ubatches, keys centred on the model's mean keys (center "1") or not."""
    import numpy as np

    from turboquant_llama.corpus import wikitext2_test_path
    from turboquant_llama.llama_python import load_llama

    corpus = wikitext2_test_path()
    llm = load_llama("smollm2", ctk, ctv, n_ctx=512, n_threads=2, n_batch=128, logits_all=True,
                     tq_key_center=center == "1", tq_exact_sink=sink == "1")
    try:
        text = corpus.read_text(encoding="utf-8")[CENTER_TEXT_OFFSET:CENTER_TEXT_OFFSET + 4000]
        toks = llm.tokenize(text.encode())[:CENTER_TOKENS]
        llm.reset()
        llm.eval(toks)
        x = np.array(llm.scores[:len(toks)], dtype=np.float64)
    finally:
        llm.close()
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("ctk,ctv", [("tq3", "tq2"), ("tq4", "tq4")])
def test_key_centering_brings_tq_closer_to_f16(ctk, ctv):
    """Centering changes no logit of an exact cache (softmax ignores a vector subtracted from every
    key), so with TQ keys it may only cut the quantization error: the mean KL divergence to the f16
    cache's next-token distributions drops with the model's calibrated mean keys (SmolLM2 over 20
    WikiText-2 chunks: tq3/tq2 0.307 -> 0.183)."""
    import numpy as np

    _require_llama_cpp()
    ref = _passage_logprobs("f16", "f16", "1")

    def kld(center: str) -> float:
        lp = _passage_logprobs(ctk, ctv, center)
        return float((np.exp(ref) * (ref - lp)).sum(axis=1).mean())

    off, on = kld("0"), kld("1")
    assert on < 0.9 * off, (off, on)


@pytest.mark.parametrize("ctk,ctv", [("tq3", "tq2"), ("tq4", "tq4")])
def test_exact_sink_brings_tq_closer_to_f16(ctk, ctv):
    """Keeping the first token's K and V rows in float32 next to their TQ codes removes the coding
    error of the token that draws the most attention: the mean KL divergence to the f16 cache
    drops (measured 0.275 -> 0.224 for tq3/tq2, 0.042 -> 0.027 for tq4: ratios 0.81 and 0.64)."""
    import numpy as np

    _require_llama_cpp()
    ref = _passage_logprobs("f16", "f16", "1")

    def kld(sink: str) -> float:
        lp = _passage_logprobs(ctk, ctv, "1", sink)
        return float((np.exp(ref) * (ref - lp)).sum(axis=1).mean())

    off, on = kld("0"), kld("1")
    assert on < 0.9 * off, (off, on)


class _LowLevel:
    """SmolLM2 through llama-cpp-python's C API: contexts with two sequences in one cache, decoding
    into a chosen sequence, sequence states; each context with or without the model's mean keys and
    the exact sink (llama_context_params.tq_key_means, tq_exact_sink)."""

    def __init__(self):
        self.lc = lc = _require_llama_cpp()
        from turboquant_llama.models import model_path

        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.mdl = lc.llama_model_load_from_file(str(model_path("smollm2")).encode(), mparams)
        assert self.mdl
        self.vocab = lc.llama_model_get_vocab(self.mdl)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.ctxs: list = []
        from turboquant_llama.calibrate import key_means

        self.means = str(key_means("smollm2")).encode()

    def close(self):
        for ctx in self.ctxs:
            self.lc.llama_free(ctx)
        self.lc.llama_model_free(self.mdl)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 8))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        return list(buf[:n])

    def new_ctx(self, ctk: str = "tq3", ctv: str = "tq2", unified: bool = True, threads: int = 2, center: bool = True,
                sink: bool = True):
        """unified=False: one cache stream per sequence (what llama-server's slots get)."""
        from turboquant_llama.llama_python import cache_type_id

        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 512, 256, 256, 2
        p.n_threads = p.n_threads_batch = threads
        p.type_k, p.type_v = cache_type_id(ctk), cache_type_id(ctv)
        p.flash_attn_type = 1
        p.kv_unified = unified
        p.tq_key_means = self.means if center else None
        p.tq_exact_sink = sink
        ctx = self.lc.llama_init_from_model(self.mdl, p)
        assert ctx
        self.ctxs.append(ctx)
        return ctx

    def decode(self, ctx, toks: list[int], seq: int, pos0: int):
        """Log-probabilities after the last token."""
        import numpy as np

        lc = self.lc
        batch = lc.llama_batch_init(len(toks), 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
                batch.seq_id[i][0], batch.logits[i] = seq, i == len(toks) - 1
            batch.n_tokens = len(toks)
            assert lc.llama_decode(ctx, batch) == 0
            x = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).astype(np.float64)
        finally:
            lc.llama_batch_free(batch)
        m = x.max()
        return x - m - np.log(np.exp(x - m).sum())

    def save_seq(self, ctx, seq: int):
        import ctypes

        size = self.lc.llama_state_seq_get_size(ctx, seq)
        state = (ctypes.c_uint8 * size)()
        assert self.lc.llama_state_seq_get_data(ctx, state, size, seq) == size
        return state

    def load_seq(self, ctx, state, seq: int):
        assert self.lc.llama_state_seq_set_data(ctx, state, len(state), seq) == len(state)

    def seq_rm(self, ctx, seq: int):
        assert self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(ctx), seq, -1, -1)


PROMPT = "The three primary colors are red, yellow and blue. Mixing two of them gives"
OTHER = "def fibonacci(n):\n    if n < 2:\n        return n\n" * 6


def _kld(p, q) -> float:
    import numpy as np

    return float((np.exp(p) * (p - q)).sum())


@pytest.fixture()
def lowlevel():
    ll = _LowLevel()
    yield ll
    ll.close()


@pytest.mark.parametrize("center", [True, False])
def test_seq_state_restored_next_to_other_keys(lowlevel, center):
    """A sequence's saved state restored into an empty cache, or next to another sequence's keys,
    continues bit for bit: the keys of both are stored against the same mean keys, a constant of
    the model, so nothing is requantized. (Without the exact sink: in a busy one-stream cache the
    stream's sink is the other sequence's first token.)"""
    import numpy as np

    ll = lowlevel
    prompt, other = ll.tokenize(PROMPT), ll.tokenize(OTHER)
    saver = ll.new_ctx(center=center, sink=False)
    first = int(np.argmax(ll.decode(saver, prompt, 0, 0)))
    state = ll.save_seq(saver, 0)
    direct = ll.decode(saver, [first], 0, len(prompt))

    empty = ll.new_ctx(center=center, sink=False)
    ll.load_seq(empty, state, 0)
    assert np.array_equal(ll.decode(empty, [first], 0, len(prompt)), direct)

    busy = ll.new_ctx(center=center, sink=False)
    ll.decode(busy, other, 1, 0)
    ll.load_seq(busy, state, 0)
    assert np.array_equal(ll.decode(busy, [first], 0, len(prompt)), direct)


def test_state_moves_between_centering_settings(lowlevel):
    """A state saved without centering (its means are zeros) loads into a centring cache with its
    rows requantized as k - m, and one saved with centred keys into a cache without centering as
    k: both continue close to their saver, closer than the TQ cache is to f16."""
    import numpy as np

    ll = lowlevel
    prompt = ll.tokenize(PROMPT)
    f16 = ll.new_ctx("f16", "f16")
    ll.decode(f16, prompt, 0, 0)
    for saved_centred in (False, True):
        saver = ll.new_ctx(center=saved_centred, sink=False)
        first = int(np.argmax(ll.decode(saver, prompt, 0, 0)))
        state = ll.save_seq(saver, 0)
        direct = ll.decode(saver, [first], 0, len(prompt))
        loader = ll.new_ctx(center=not saved_centred, sink=False)
        ll.load_seq(loader, state, 0)
        moved = ll.decode(loader, [first], 0, len(prompt))
        exact = ll.decode(f16, [first], 0, len(prompt))
        ll.seq_rm(f16, 0)
        ll.decode(f16, prompt, 0, 0)
        assert 0.0 < _kld(direct, moved) < _kld(exact, direct), (saved_centred, _kld(direct, moved), _kld(exact, direct))


def test_exact_sink_ends_when_its_cell_is_overwritten(lowlevel):
    """The sink's float32 rows belong to one cell: once another token is written there (here after
    the sequence was removed and a new one took cell 0), that cell's TQ code counts again, so the
    new sequence sees what it sees without the exact sink, bit for bit, while the first sequence's
    logits did depend on it."""
    import numpy as np

    ll = lowlevel
    prompt, other = ll.tokenize(PROMPT), ll.tokenize(OTHER)
    second = ll.tokenize("Water boils at one hundred degrees Celsius at sea level, and")
    if second[0] == prompt[0]:  # a shared first token would write the same row at the same place
        second = second[1:]
    out = {}
    for sink in ("1", "0"):
        ctx = ll.new_ctx(sink=sink == "1")
        first = ll.decode(ctx, prompt, 0, 0)
        ll.decode(ctx, other, 1, 0)
        ll.seq_rm(ctx, 0)
        again = ll.decode(ctx, second, 0, 0)
        out[sink] = (first, again)
    assert not np.array_equal(out["1"][0], out["0"][0])
    assert np.array_equal(out["1"][1], out["0"][1])


def test_each_stream_keeps_its_own_sink(lowlevel):
    """With one cache stream per sequence (llama-server's slots without --kv-unified), every stream
    keeps the exact rows of its own first token: the second sequence sees the same with or without
    a first sequence in the other stream, bit for bit, and the same as alone in a one-stream cache;
    and it does see its sink (the logits differ without the exact sink)."""
    import numpy as np

    ll = lowlevel
    prompt, other = ll.tokenize(PROMPT), ll.tokenize(OTHER)
    out = {}
    for sink in ("1", "0"):
        both = ll.new_ctx(unified=False, sink=sink == "1")
        ll.decode(both, prompt, 0, 0)
        out["both", sink] = ll.decode(both, other, 1, 0)
        alone = ll.new_ctx(unified=False, sink=sink == "1")
        out["alone", sink] = ll.decode(alone, other, 1, 0)
    out["unified"] = ll.decode(ll.new_ctx(), other, 1, 0)
    assert np.array_equal(out["both", "1"], out["alone", "1"])
    assert np.array_equal(out["both", "1"], out["unified"])
    assert np.array_equal(out["both", "0"], out["alone", "0"])
    assert not np.array_equal(out["both", "1"], out["both", "0"])


@pytest.mark.parametrize("center", [True, False])
def test_seq_state_carries_its_streams_sink(lowlevel, center):
    """The saved state of a sequence in the second stream carries that stream's sink rows:
    restored into an empty two-stream cache it continues bit for bit, and differently from a state
    restored into a cache without the exact sink."""
    import numpy as np

    ll = lowlevel
    prompt, other = ll.tokenize(PROMPT), ll.tokenize(OTHER)
    saver = ll.new_ctx(unified=False, center=center)
    ll.decode(saver, prompt, 0, 0)
    first = int(np.argmax(ll.decode(saver, other, 1, 0)))
    state = ll.save_seq(saver, 1)
    direct = ll.decode(saver, [first], 1, len(other))

    loader = ll.new_ctx(unified=False, center=center)
    ll.load_seq(loader, state, 1)
    assert np.array_equal(ll.decode(loader, [first], 1, len(other)), direct)

    loader = ll.new_ctx(unified=False, center=center, sink=False)
    ll.load_seq(loader, state, 1)
    assert not np.array_equal(ll.decode(loader, [first], 1, len(other)), direct)


def test_reused_graphs_keep_the_cache_updates(lowlevel):
    """Graphs hold the sink-row updates only for the ubatches that make them (patches/0010), and
    llama.cpp reuses a graph for the next ubatch of the same shape: a one-token ubatch into an
    emptied cache, after one-token ubatches that made no update, must still set the sink (same
    logits as in a fresh cache, bit for bit, for it and the token after it)."""
    import numpy as np

    ll = lowlevel
    toks = ll.tokenize(PROMPT)
    used = ll.new_ctx()
    ll.decode(used, toks[:2], 0, 0)  # a two-token graph makes the updates ...
    for i, t in enumerate(toks[2:4]):  # ... and a one-token graph without them is built and reused
        ll.decode(used, [t], 0, 2 + i)
    ll.seq_rm(used, 0)
    fresh = ll.new_ctx()
    for i, t in enumerate(toks[4:6]):
        assert np.array_equal(ll.decode(used, [t], 0, i), ll.decode(fresh, [t], 0, i))


def test_one_token_rows_quantize_the_same_on_any_thread_count(lowlevel):
    """A decoded token's K/V row (3 blocks of 64 on SmolLM2) is quantized by several threads when
    there are fewer rows than threads (patches/0005), block by block: the cache holds the same bytes
    and the logits are the same, bit for bit, with 1, 2 and 4 threads."""
    import numpy as np

    ll = lowlevel
    toks = ll.tokenize(PROMPT)[:6]
    logits, states = {}, {}
    for threads in (1, 2, 4):
        ctx = ll.new_ctx(threads=threads)
        logits[threads] = [ll.decode(ctx, [t], 0, i) for i, t in enumerate(toks)]
        states[threads] = bytes(ll.save_seq(ctx, 0))
    for threads in (2, 4):
        assert states[threads] == states[1]
        assert all(np.array_equal(a, b) for a, b in zip(logits[threads], logits[1]))


def test_prompt_attention_is_the_same_on_any_thread_count(lowlevel):
    """A prompt's query rows are split between threads in chunks whose size depends on the thread
    count, and the TQ attention tiles group up to 64 rows of a chunk that read one K/V head
    (patches/0005). With 86 tokens, SmolLM2's 3 query heads per K/V head make blocks of 258 rows:
    one thread groups them 64, 64, 64, 64 and 2, other counts differently. The logits after the
    prompt are the same, bit for bit, with 1, 2 and 4 threads. (The model's matrix products round
    their inputs to 8 bits, which hides last-bit differences in attention outputs; that each row's
    result does not depend on its group is checked bit for bit in tests/native/tq_simd_check.c.)"""
    import numpy as np

    ll = lowlevel
    toks = (ll.tokenize(PROMPT) * 8)[:86]
    logits = {threads: ll.decode(ll.new_ctx(threads=threads), toks, 0, 0) for threads in (1, 2, 4)}
    assert np.array_equal(logits[2], logits[1])
    assert np.array_equal(logits[4], logits[1])


def test_states_move_between_exact_sink_settings(lowlevel):
    """A state saved without the exact sink loads bit for bit into a cache that keeps one (there is
    no sink to adopt); one saved with it loads into a cache without it and continues from the TQ
    codes alone, close to the saver."""
    import numpy as np

    ll = lowlevel
    prompt = ll.tokenize(PROMPT)
    states, direct, first = {}, {}, {}
    for sink in ("0", "1"):
        saver = ll.new_ctx(sink=sink == "1")
        first[sink] = int(np.argmax(ll.decode(saver, prompt, 0, 0)))
        states[sink] = ll.save_seq(saver, 0)
        direct[sink] = ll.decode(saver, [first[sink]], 0, len(prompt))

    loader = ll.new_ctx()
    ll.load_seq(loader, states["0"], 0)
    assert np.array_equal(ll.decode(loader, [first["0"]], 0, len(prompt)), direct["0"])

    loader = ll.new_ctx(sink=False)
    ll.load_seq(loader, states["1"], 0)
    moved = ll.decode(loader, [first["1"]], 0, len(prompt))
    f16 = ll.new_ctx("f16", "f16")
    ll.decode(f16, prompt, 0, 0)
    exact = ll.decode(f16, [first["1"]], 0, len(prompt))
    assert 0.0 < _kld(direct["1"], moved) < _kld(exact, direct["1"]), (_kld(direct["1"], moved), _kld(exact, direct["1"]))
    # no check on the top token: a KL of 0.11 (against 0.37 to f16) swaps candidates 0.7 logit
    # apart in this continuation, as the cache's own distance to f16 does

def test_cache_options_as_keyword_arguments():
    """load_llama's tq_protect_layers reaches llama.cpp's cache (a state of the same ~130 tokens is
    smaller with every layer at tq3/tq2 than with the first and last at q8_0); a bad value is a
    clear error before llama.cpp sees it."""
    _require_llama_cpp()
    from turboquant_llama.llama_python import load_llama

    sizes = {}
    for protect in (0, 1, 3):
        llm = load_llama("smollm2", "tq3", "tq2", n_ctx=N_CTX, n_threads=1, n_batch=N_CTX, tq_protect_layers=protect)
        try:
            # enough tokens that rows, not the per-layer exact-sink rows and key means, dominate
            llm.eval(llm.tokenize(b"The three primary colors are red, yellow and blue. " * 12))
            sizes[protect] = len(llm.save_state().llama_state)
        finally:
            llm.close()
    assert sizes[0] < sizes[1] < sizes[3]
    with pytest.raises(ValueError, match="tq_key_center must be True or False"):
        load_llama("smollm2", "tq3", "tq2", n_ctx=N_CTX, tq_key_center="off")


def test_agreement_file_records_its_command_and_switches(tmp_path, monkeypatch, capsys):
    """The agreement run writes through the results writer: the command that made the file, with
    the options it was given, and every switch."""
    from turboquant_llama import llama_python as lp
    from turboquant_llama.cli import main

    seen = {}

    def fake(model, pairs, n_tokens, options):
        seen.update(options)
        return {f"{k}/{v}": {"identical_fraction": 1.0, "first_token_fraction": 1.0, "mean_common_prefix": 8.0}
                for k, v in pairs}

    monkeypatch.setattr(lp, "measure_agreement", fake)
    monkeypatch.setenv("TQ_ATTN_ROWS", "0")
    out = tmp_path / "agreement.json"
    assert main(["python-agreement", "--output", str(out), "--tq-exact-sink", "off"]) == 0
    data = json.loads(out.read_text())
    assert data["command"] == f"TQ_ATTN_ROWS=0 tq python-agreement --model smollm2 --n-tokens 8 --output {out} " \
                              "--tq-exact-sink off"
    assert data["switches"]["exact_sink"] == "off" and data["switches"]["attn_rows"] == "off"
    assert seen == {"tq_exact_sink": False, "tq_key_center": True, "tq_protect_layers": 1}
    assert set(data["pairs"]) == {"tq4/tq4", "tq3/tq3", "tq3/tq2", "tq2/tq2", "q8_0/q8_0", "q4_0/q4_0"}
    assert main(["python-agreement", "--output", str(tmp_path / "a.txt")]) == 2
    assert "give a .json file" in capsys.readouterr().err


def test_cuda_build_that_cannot_load_names_the_switch(tmp_path):
    """A CUDA build taken because it exists, on a machine where it cannot load (no NVIDIA driver: here a
    libllama.so that is no library), fails with an error that says how to take the CPU build instead."""
    require_llama_cpp()   # llama-cpp-python installed (skips, or fails under TQ_REQUIRE_BUILD=1)
    (tmp_path / "build-cuda" / "bin").mkdir(parents=True)
    (tmp_path / "build-cuda" / "bin" / "libllama.so").write_bytes(b"not a library")
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_CUDA", "TQ_BUILD_DIR", "LLAMA_CPP_LIB_PATH")}
    env["TQ_CACHE_DIR"] = str(tmp_path)
    code = ("from turboquant_llama.errors import UserError\n"
            "from turboquant_llama.llama_python import import_llama_cpp\n"
            "try:\n    import_llama_cpp()\nexcept UserError as e:\n    print('USERERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "USERERROR" in out.stdout, out.stdout + out.stderr
    assert "could not load" in out.stdout and "TQ_CUDA=0" in out.stdout
