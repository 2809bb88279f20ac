"""`tq eval quality`: KV-cache quality against the f16 cache with llama-perplexity.

For one model, corpus, context and chunk count, llama-perplexity runs once with an f16 cache and
saves its logits (`--kl-divergence-base`, cached under <cache>/kld/); then once per K/V pair with
`--kl-divergence`, which gives PPL, the mean KL divergence to the f16 logits and the top-1
agreement ("Same top p"). Results go to <out-dir>/quality-<model>.{json,md,png}; runs accumulate,
rows keyed by (K, V, variant), where the variant names the switches (switches.py) that differ
from their defaults and matter for the pair. Each row records the build that measured it (sha256 of
the binary and libraries, git HEAD): TQ_BUILD_DIR points at another build folder. The corpus is
the packaged WikiText-2 test text unless --corpus or TQ_CORPUS name another.

Running and parsing llama-perplexity: perplexity.py; the results file: quality_results.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from . import REPO_ROOT, results, switches
from .arguments import int_arg, thread_count
from .cache_types import CACHE_TYPES, bits_per_value, parse_type_specs
from .corpus import default_corpus, is_packaged
from .errors import UserError
from .gpu_split import add_split_arguments, check_split, command_parts, split_from_args
from .kv_memory import bits_per_value as layers_bits_per_value
from .kv_memory import bytes_per_token
from .kv_shape import HeadSizeError, KvShape, model_kv_shape
from .perplexity import QualityRun, build_fingerprint, kld_dir, pair_label
from .quality_results import fmt, write_results

VALID_TYPES: tuple[str, ...] = tuple(n for n in CACHE_TYPES if n != "f32")
DEFAULT_TYPES = "f16,q8_0,q4_0,tq4,tq3,tq3/tq2"
DEFAULT_CTX = 512


def pair_bpv(k: str, v: str) -> float:
    return (bits_per_value(k) + bits_per_value(v)) / 2.0


def pair_sizes(shape: KvShape, k: str, v: str, setting: Mapping[str, switches.Value]) -> tuple[float, int]:
    """(bits per value, KV bytes per token) of a pair under a setting: the mean of K's and V's
    bits per value, each averaged over the layers (protected layers count at q8_0)."""
    protect = int(setting["protect_layers"])
    return layers_bits_per_value(shape, k, v, protect), bytes_per_token(shape, k, v, protect)


# --- the command -------------------------------------------------------------------------------------------


def _tq_command(args: argparse.Namespace, setting: Mapping[str, switches.Value], corpus: Path) -> str:
    parts = ["tq", "eval", "quality", "--model", args.model, "--types", args.types, "--chunks", str(args.chunks),
             "--ctx", str(args.ctx), "--threads", str(args.threads)]
    if args.corpus or not is_packaged(corpus):   # TQ_CORPUS as an argument: the command says which text
        parts += ["--corpus", str(args.corpus or corpus)]
    if args.cuda:
        parts.append("--cuda")
    parts += command_parts(split_from_args(args))
    if args.out_dir:
        parts += ["--out-dir", str(args.out_dir)]
    if args.json:
        parts.append("--json")
    return results.command(parts, setting)


def evaluate_quality(args: argparse.Namespace) -> list[dict]:
    from .build import find_binary
    from .models import model_path
    from .upstream import UPSTREAM

    pairs = parse_type_specs(args.types, DEFAULT_TYPES)
    split = split_from_args(args)
    check_split(split, args.cuda, offload_hint="add --cuda (every layer on the GPUs)")
    model = model_path(args.model)
    label = results.model_label(args.model)
    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if not corpus.is_file():
        raise UserError(f"corpus {corpus} does not exist")
    binary = find_binary("llama-perplexity", cuda=args.cuda)
    shape = model_kv_shape(model)
    for k, v in pairs:
        try:
            shape.check_types(k, v)
        except HeadSizeError as exc:
            print(f"tq: warning: {label}: {exc}: llama.cpp will refuse {pair_label(k, v)}", file=sys.stderr)

    setting = switches.apply_args(args)
    env = switches.env_texts(switches.child_env(setting))
    tq_command = _tq_command(args, setting, corpus)
    date = results.now()
    out_dir = Path(args.out_dir) if args.out_dir else REPO_ROOT / "results"
    run = QualityRun(args.model, model, label, corpus, args.ctx, args.chunks, args.threads, args.cuda, binary,
                     kld_dir() / "logs" / results.safe_name(label), setting, split)

    to_run = [p for p in pairs if p != ("f16", "f16")]
    bar = tqdm(total=len(to_run) + 1, desc=f"{label}: f16 base", unit="run", file=sys.stderr, dynamic_ncols=True)
    base, base_info = run.ensure_base(bar)
    bar.update(1)

    common = {"ctx": args.ctx, "chunks": args.chunks, "chunks_used": base_info.get("chunks_used"),
              "threads": args.threads, "backend": "cuda" if args.cuda else "cpu", "corpus": corpus.name,
              "env": env, "switches": switches.describe(setting), "date": date, "tq_command": tq_command,
              "llama_cpp_commit": UPSTREAM.llama_cpp_commit}
    rows: list[dict] = []
    failures: list[str] = []
    for k, v in pairs:
        variant = switches.variant(k, v, setting)
        bpv, bytes_token = pair_sizes(shape, k, v, setting)
        row = {"k": k, "v": v, "variant": variant, "bpv": bpv, "kv_bytes_per_token": bytes_token}
        if (k, v) == ("f16", "f16"):
            row.update({"ppl": base_info["ppl"], "ppl_stderr": base_info.get("ppl_stderr"), "ppl_base": base_info["ppl"],
                        "ppl_change_pct": 0.0, "kld": 0.0, "kld_stderr": 0.0, "top1": 100.0, "top1_stderr": 0.0,
                        "command": base_info.get("command"), "log": base_info.get("log")})
            row.update(common)
            rows.append(row)
            continue
        bar.set_description(f"{label}: {pair_label(k, v)}" + (f" [{variant}]" if variant else ""))
        bar.set_postfix_str("")
        build = build_fingerprint(binary)
        try:
            result, cmd, log = run.run_pair(base, k, v, variant, bar)
        except UserError as exc:
            failures.append(str(exc))
            bar.write(f"tq: error: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        # PPL change against the f16 run's own PPL: "Mean PPL(base)" of the KLD run is computed from
        # the saved uint16-packed log-probs and reads up to 0.5% low (an f16/f16 KLD run gives
        # PPL(Q) = the base run's PPL but PPL(Q)/PPL(base) = 1.005 on SmolLM2, 2 chunks)
        ppl_base = base_info["ppl"]
        row.update(result)
        row["ppl_base_saved_logits"] = row.pop("ppl_base", None)
        row.pop("ppl_base_stderr", None)
        row["ppl_base"] = ppl_base
        row["ppl_change_pct"] = None if result["ppl"] is None or not ppl_base else 100.0 * (result["ppl"] / ppl_base - 1.0)
        row.update({"command": cmd, "log": str(log), "build": build})
        row.update(common)
        rows.append(row)
        bar.update(1)
    bar.close()

    model_info = {"file": model.name, "n_layer": shape.n_layer, "n_head_kv": max(l.n_head_kv for l in shape.layers),
                  "key_length": max(l.head_k for l in shape.layers), "value_length": max(l.head_v for l in shape.layers),
                  "corpus": corpus.name}
    run_meta = {"date": date, "tq_command": tq_command, "chunks": args.chunks, "ctx": args.ctx,
                "threads": args.threads, "env": env, "switches": switches.describe(setting),
                "llama_cpp_commit": UPSTREAM.llama_cpp_commit,
                "pairs": [pair_label(k, v) for k, v in pairs], "failed": len(failures),
                "base_logits": str(base)}
    if rows:
        write_results(out_dir, label, rows, run_meta, model_info)
    if failures:
        raise UserError(f"{len(failures)} of {len(to_run)} runs failed (results of the others are in {out_dir}):\n"
                        + "\n".join(failures))
    return rows


def _cmd_quality(args: argparse.Namespace) -> int:
    rows = evaluate_quality(args)
    if args.json:
        print(json.dumps(results.clean(rows), indent=1, ensure_ascii=False))
    else:
        for r in rows:
            change = r.get("ppl_change_pct")
            print(f"{pair_label(r['k'], r['v']):16s} {r.get('variant') or '':24s} bpv {r['bpv']:5.2f}  "
                  f"PPL {fmt(r.get('ppl'), '.4f')} ({'n/a' if change is None else f'{change:+.2f}%'})  "
                  f"KLD {fmt(r.get('kld'), '.5f')}  top-1 {fmt(r.get('top1'), '.2f')}%  "
                  f"{r['kv_bytes_per_token']} B/token")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate KV-cache types with the built llama.cpp (quality)")
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION")
    esub.required = True
    q = esub.add_parser(
        "quality",
        help="PPL, KL divergence and top-1 agreement against the f16 cache (llama-perplexity)",
        description="Run llama-perplexity once with an f16 cache to save its logits (cached), then once per "
                    "K/V pair with --kl-divergence. The TQ cache options below and the measurement variables "
                    "(TQ_NORM_CORRECTION, TQ_SCALE_SEARCH, LLAMA_ATTN_ROT_DISABLE, TQ_ATTN_ROWS) are "
                    "recorded; rows are keyed by K, V and the switches that change them.")
    q.add_argument("--model", required=True, help="model name (see `tq models list`) or a .gguf path")
    q.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated cache types: X means K = V = X, X/Y means K = X, V = Y (default {DEFAULT_TYPES}); "
                        f"valid: {', '.join(VALID_TYPES)}")
    q.add_argument("--chunks", type=int_arg(1, what="a chunk count"), default=20, help="number of chunks of the corpus (default 20)")
    q.add_argument("--corpus", default=None,
                   help="evaluation text (default: TQ_CORPUS, else the packaged WikiText-2 raw test, wiki.test.raw)")
    q.add_argument("--ctx", type=int_arg(16, what="a context size in tokens"), default=DEFAULT_CTX, help=f"context size per chunk (default {DEFAULT_CTX})")
    q.add_argument("--threads", "-t", type=thread_count, default=os.cpu_count() or 2, help="CPU threads (default: all cores)")
    q.add_argument("--cuda", action="store_true", help="use the CUDA build with all layers on the GPU (-ngl 99)")
    add_split_arguments(q, needs="--cuda")
    q.add_argument("--json", action="store_true", help="print the results as a JSON list")
    q.add_argument("--out-dir", default=None, help="where quality-<model>.{json,md,png} go (default: results/)")
    switches.add_option_arguments(q)
    q.set_defaults(func=_cmd_quality)

