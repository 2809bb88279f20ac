"""End-to-end KL divergence of key codes that are no cache type (yet), by fake quantization: the
keys a code would give back are written into an f16 K cache through the scheduler's eval callback
(kv_dump's cb_eval), so the model attends over exactly them; V is a real cache type. Issue 18's
outlier split (the paper's 2.5 and 3.5 bits per value, key_code.outlier_split_round_trip) is
measured this way beside real caches of the same run: tq3 keys, real and fake (the fake one
through the NumPy reference: it checks the method), and tq3c.

Every key code here works as `tq` runs TQ keys: centred on the model's mean keys (calibrate.py),
the mean added back after decoding. No layer is kept at q8_0 and no sink row is exact (both are
TQ cache options, off in every row), so the rows differ in their keys only.

    rows = fake_keys.measure("smollm2", ["f16", "tq3", "fake-tq3", "outlier-2.5", "outlier-3.5", "tq3c"], "tq3")
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cache_types import SPLIT_NAMES
from .errors import UserError
from .kv_dump import GGML_TYPE_F16, LLAMA_FLASH_ATTN_TYPE_ENABLED, GgmlTensor, dump_kv, load_cpu_model

GGML_OP_ROPE = 48          # enum ggml_op of the pinned ggml.h: the K rows a cache stores come out of RoPE
OUTLIER_SPLITS = {"outlier-2.5": (4, 2), "outlier-3.5": (5, 3)}   # bits of the outlier quarter, of the rest
REAL_KEYS = ("f16", "q8_0", "q4_0", "tq2", "tq3", "tq4", "tq3c", "tq2o", "tq3o")   # cache types, measured as they are
KEY_CODES = (*REAL_KEYS, "fake-tq3", *OUTLIER_SPLITS)


@dataclass
class KeyCodeRow:
    keys: str
    values: str
    kld: float          # mean over the scored tokens of KL(f16 cache || this one)
    top1: float         # share of scored tokens whose most likely next token is f16's
    ppl: float          # perplexity of the scored tokens
    n_tokens: int


def _fake_rounders(model: Path, codes: list[str], n_cal: int, center: bool = True) -> dict[str, Callable[[int, np.ndarray], np.ndarray]]:
    """Per fake code: a function (layer, rows [n, n_head_kv, d] float32) -> the rows it gives back,
    centred on the model's mean keys as `tq` centres TQ keys; the outlier channels calibrated per
    layer and KV head on the calibration text (never the evaluation text)."""
    from .calibrate import calibration_text, measure_key_means
    from .key_code import _tq_round_trip, calibrate_outlier_split, outlier_split_round_trip

    means = measure_key_means(model) if center else None
    fakes = [c for c in codes if c == "fake-tq3" or c in OUTLIER_SPLITS]
    rounders: dict[str, Callable[[int, np.ndarray], np.ndarray]] = {}
    cal = dump_kv(model, calibration_text(), n_tokens=n_cal, n_threads=2) if any(c in OUTLIER_SPLITS for c in fakes) else None

    def centred(il: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if means is None:
            return rows, np.zeros(rows.shape[1:], dtype=np.float32)
        mean = np.asarray(means[il], dtype=np.float32).reshape(rows.shape[1], rows.shape[2])
        return rows - mean, mean

    for code in fakes:
        if code == "fake-tq3":
            def tq3(il: int, rows: np.ndarray) -> np.ndarray:
                x, mean = centred(il, rows)
                return _tq_round_trip(x.reshape(-1, x.shape[-1]), "tq3").astype(np.float32).reshape(x.shape) + mean
            rounders[code] = tq3
            continue
        hi, lo = OUTLIER_SPLITS[code]
        splits = {}
        for il, (k_all, q_all) in enumerate(zip(cal["Kcur"], cal["Qcur"])):
            k_all, q_all = k_all[1:].astype(np.float64), q_all[1:].astype(np.float64)
            hkv, d = k_all.shape[1], k_all.shape[2]
            g = q_all.shape[1] // hkv
            mean = np.asarray(means[il], dtype=np.float64).reshape(hkv, d) if center else np.zeros((hkv, d))
            splits[il] = [calibrate_outlier_split(k_all[:, h] - mean[h], q_all[:, h * g:(h + 1) * g], d // 4, hi, lo)
                          for h in range(hkv)]

        def split_round_trip(il: int, rows: np.ndarray, splits=splits) -> np.ndarray:
            x, mean = centred(il, rows)
            out = np.empty_like(x)
            for h, split in enumerate(splits[il]):
                out[:, h] = outlier_split_round_trip(split, x[:, h]).astype(np.float32)
            return out + mean
        rounders[code] = split_round_trip
    return rounders


def _rope_k_callback(llama_cpp, rounder: Callable[[int, np.ndarray], np.ndarray], hits: list[int], errors: list[str]):
    """A cb_eval that replaces each layer's K rows (the RoPE output named Kcur-<layer>) by what the
    code gives back, in place, before the cache stores them. ctypes drops an exception raised in a
    callback, so what goes wrong is appended to errors (the caller raises it) and the graph stops."""
    def cb(t_ptr, ask, _user):
        try:
            return replace(t_ptr, ask)
        except Exception as exc:   # noqa: BLE001: any failure of the code must reach the caller
            errors.append(f"{exc.__class__.__name__}: {exc}")
            return False

    def replace(t_ptr, ask):
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode("utf-8", "replace")
        if not name.startswith("Kcur-"):
            return False if ask else True
        if ask:
            return True
        if t.op != GGML_OP_ROPE:
            return True
        if t.type != 0 or int(t.nb[0]) != 4 or int(t.nb[1]) != 4 * int(t.ne[0]) or int(t.nb[2]) != 4 * int(t.ne[0] * t.ne[1]):
            raise RuntimeError(f"{name}: not a contiguous float32 tensor; fake keys need one")
        ne0, ne1, ne2 = int(t.ne[0]), int(t.ne[1]), int(t.ne[2]) * int(t.ne[3])
        buf = (ctypes.c_float * (ne0 * ne1 * ne2)).from_address(t.data)
        rows = np.frombuffer(buf, dtype=np.float32).reshape(ne2, ne1, ne0)
        rows[...] = rounder(int(name.split("-", 1)[1]), rows.copy())
        hits.append(1)
        return True
    return llama_cpp.ggml_backend_sched_eval_callback(cb)


def measure(model: str | Path, codes: list[str], values: str = "tq3", n_ctx: int = 512, n_chunks: int = 20,
            threads: int = 2, text: str | None = None, n_cal: int = 1024, center: bool = True,
            exact_sink: bool = False) -> list[KeyCodeRow]:
    """KL divergence, top-1 agreement and perplexity against an f16 cache, with keys by each code of
    KEY_CODES and values in `values`, over n_chunks chunks of n_ctx tokens of the evaluation text
    (WikiText-2 test), scoring each chunk's second half as llama-perplexity does."""
    from .calibrate import key_means, split_transforms, tq3c_ctx_for, tq3c_transforms
    from .key_code import wikitext_text
    from .llama_python import cache_type_id, import_llama_cpp
    from .models import model_path

    unknown = [c for c in codes if c not in KEY_CODES]
    if unknown:
        raise UserError(f"unknown key code {', '.join(unknown)}: choose from {', '.join(KEY_CODES)}")
    path = model_path(str(model))
    text = wikitext_text(n_chunks * n_ctx * 8) if text is None else text
    rounders = _fake_rounders(path, codes, n_cal, center)
    lc = import_llama_cpp(cuda=False)
    mdl = load_cpu_model(lc, path)
    keep: list = []          # the callbacks must outlive their contexts
    ctxs: dict[str, object] = {}
    hits: dict[str, list[int]] = {}
    callback_errors: list[str] = []
    try:
        vocab = lc.llama_model_get_vocab(mdl)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        raw = text.encode()
        toks = (lc.llama_token * (len(raw) + 16))()
        n_text = lc.llama_tokenize(vocab, raw, len(raw), toks, len(toks), False, False)
        if n_text < n_ctx:
            raise UserError(f"the evaluation text has {n_text} tokens, fewer than one chunk of {n_ctx}")
        n_chunks = min(n_chunks, n_text // n_ctx)

        def context(name: str, type_k: int, type_v: int, key_means_path: str | None, rounder=None):
            cp = lc.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
            cp.n_threads = cp.n_threads_batch = threads
            cp.type_k, cp.type_v = type_k, type_v
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED
            cp.offload_kqv = False
            cp.tq_protect_layers = 0
            cp.tq_exact_sink = exact_sink
            cp.tq_key_means = key_means_path.encode() if key_means_path else None
            if rounder is not None:
                hits[name] = []
                cb = _rope_k_callback(lc, rounder, hits[name], callback_errors)
                keep.append(cb)
                cp.cb_eval, cp.cb_eval_user_data = cb, None
            ctx = lc.llama_init_from_model(mdl, cp)
            if not ctx:
                raise UserError(f"{name}: llama.cpp could not make the context (K {type_k}, V {type_v})")
            ctxs[name] = ctx

        tv = cache_type_id(values)
        context("base", GGML_TYPE_F16, GGML_TYPE_F16, None)
        for code in codes:
            if code == "tq3c":
                context(code, cache_type_id("tq3c"), tv, str(tq3c_transforms(path, tq3c_ctx_for(n_ctx), quiet=True)))
            elif code in SPLIT_NAMES:   # the outlier split as cache types (their own mean and transforms)
                context(code, cache_type_id(code), tv, str(split_transforms(path, quiet=True)))
            elif code in ("tq2", "tq3", "tq4"):
                context(code, cache_type_id(code), tv, str(key_means(path, quiet=True)) if center else None)
            elif code in REAL_KEYS:
                context(code, cache_type_id(code), tv, None)
            else:
                context(code, GGML_TYPE_F16, tv, None, rounders[code])

        first = n_ctx // 2
        sums = {c: np.zeros(3) for c in codes}   # kld, top-1 hits, -log p(next)
        n_scored = 0

        def log_probs(ctx, chunk: np.ndarray) -> np.ndarray:
            batch = lc.llama_batch_init(n_ctx, 0, 1)
            try:
                for j in range(n_ctx):
                    batch.token[j] = int(chunk[j])
                    batch.pos[j] = j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = j >= first
                batch.n_tokens = n_ctx
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                rc = lc.llama_decode(ctx, batch)
                if callback_errors:
                    raise UserError(f"the key code failed inside llama.cpp's eval callback: {callback_errors[0]}")
                if rc != 0:
                    raise UserError(f"llama_decode failed ({rc})")
            finally:
                lc.llama_batch_free(batch)
            logits = np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
                               for j in range(first, n_ctx - 1)]).astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

        for i in tqdm(range(n_chunks), desc="fake keys", unit="chunk", file=sys.stderr):
            chunk = np.array(toks[i * n_ctx:(i + 1) * n_ctx])
            base = log_probs(ctxs["base"], chunk)
            nxt = chunk[first + 1:]
            p = np.exp(base)
            for code in codes:
                lq = log_probs(ctxs[code], chunk)
                sums[code] += [float(np.sum(p * (base - lq))), float(np.sum(lq.argmax(1) == base.argmax(1))),
                               float(-np.sum(lq[np.arange(len(nxt)), nxt]))]
            n_scored += len(nxt)
        for code, h in hits.items():
            if not h:
                raise RuntimeError(f"{code}: the callback changed no K rows: the fake keys did not reach the cache")
    finally:
        for ctx in ctxs.values():
            lc.llama_free(ctx)
        lc.llama_model_free(mdl)
    return [KeyCodeRow(keys=c, values=values, kld=s[0] / n_scored, top1=s[1] / n_scored, ppl=float(np.exp(s[2] / n_scored)),
                       n_tokens=n_scored) for c, s in sums.items()]


# --- results and `tq eval keys` ------------------------------------------------------------------

def _bits_label(code: str, d: int) -> str:
    """Bits a value of the code, its norms included (what the table compares)."""
    from .cache_types import bits_per_value

    if code in OUTLIER_SPLITS:
        hi, lo = OUTLIER_SPLITS[code]
        return f"{(d // 4 * hi + (d - d // 4) * lo + 32) / d:.2f}"   # two fp16 norms a head
    return f"{bits_per_value('tq3' if code == 'fake-tq3' else code):.2f}"


def write_results(rows: list[KeyCodeRow], model: str, head_dim: int, command: str, out_dir: Path) -> Path:
    from . import results

    files = results.ResultFiles(out_dir, f"keys-{results.safe_name(model)}-v{rows[0].values}")
    md = [f"# Key codes end to end, {model}, values {rows[0].values}", "",
          f"Made by `{command}` on {results.now()}. KL divergence, top-1 agreement and perplexity against an f16 "
          f"cache over {rows[0].n_tokens} scored tokens (the second half of each chunk). Real cache types as they "
          "are; fake-* and outlier-* are keys written into an f16 K cache by the eval callback (pytools/fake_keys.py). "
          "TQ, fake and outlier keys centred on the model's mean keys (tq3c on its own mean), q4_0 as llama.cpp stores it; "
          "no layer at q8_0, no exact sink row.", "",
          "| keys | bits/value | KLD | top-1 | PPL |", "|---|---|---|---|---|"]
    md += [f"| {r.keys} | {_bits_label(r.keys, head_dim)} | {r.kld:.4f} | {100 * r.top1:.1f}% | {r.ppl:.3f} |" for r in rows]

    def plot(png: Path) -> None:
        plt = results.pyplot()
        fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 3.6))
        ax.bar([r.keys for r in rows], [r.kld for r in rows],
               color=["tab:orange" if r.keys.startswith(("outlier", "fake")) else "tab:gray" for r in rows])
        ax.set_ylabel("KL divergence to f16")
        ax.set_title(f"{model}: keys by code, values {rows[0].values}")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)

    results.write(files, {"model": model, "command": command, "date": results.now(),
                          "rows": [dataclasses.asdict(r) for r in rows]}, "\n".join(md) + "\n", plot)
    return out_dir / files.stem


def add_commands(sub) -> None:
    import argparse

    from . import REPO_ROOT
    from .arguments import int_arg, thread_count
    from .niah import _eval_subparsers

    p = _eval_subparsers(sub).add_parser(
        "keys", help="KL divergence of key codes end to end, cache types and fake-quantized ones (the outlier split)",
        description="Keys by each code (real cache types, or codes that are no type, written into an f16 K cache "
                    "through llama.cpp's eval callback), values in --values, KL divergence against an f16 cache "
                    "over chunks of WikiText-2 (llama-cpp-python, CPU). Writes <out-dir>/keys-<model>-v<values>.*")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--keys", default="tq3,fake-tq3,outlier-2.5,outlier-3.5,tq4,tq3c",
                   help=f"comma-separated key codes: {', '.join(KEY_CODES)}")
    p.add_argument("--values", default="f16", help="the V cache type of every row (default f16: keys alone)")
    p.add_argument("--ctx", type=int_arg(64, what="a chunk size"), default=512)
    p.add_argument("--chunks", type=int_arg(1, what="a chunk count"), default=20)
    p.add_argument("--threads", "-t", type=thread_count, default=2)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results")
    p.set_defaults(func=_cmd_keys)
    del argparse


def _cmd_keys(args) -> int:
    from .kv_shape import model_kv_shape
    from .models import model_path
    from . import results

    codes = [c.strip() for c in args.keys.split(",") if c.strip()]
    rows = measure(args.model, codes, args.values, n_ctx=args.ctx, n_chunks=args.chunks, threads=args.threads)
    d = model_kv_shape(model_path(args.model)).layers[0].head_k
    command = (f"tq eval keys --model {args.model} --keys {','.join(codes)} --values {args.values} --ctx {args.ctx} "
               f"--chunks {args.chunks}")
    stem = write_results(rows, results.model_label(args.model), d, command, args.out_dir)
    print((stem.parent / (stem.name + ".md")).read_text())
    return 0
