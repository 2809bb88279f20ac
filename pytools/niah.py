"""`tq eval niah`: needle-in-a-haystack retrieval with each KV-cache type.

A haystack of WikiText-2 text (the packaged test set unless --filler or TQ_CORPUS name another;
consecutive lines from a seeded offset) hides one needle sentence, "The special magic number for
<city> is <6-7 digits>.", at a given depth (a fraction of the haystack, snapped to a sentence or
line boundary); a question at the end asks for the number. The whole prompt, chat template, instruction, question and answer prefix
included, is sized to the target length in the model's own tokens (1k = 1024 tokens, trimmed
word by word at the start of the haystack, so it comes out at most a few tokens short).

The prompt is the model's chat template (tokenizer.chat_template, rendered by llama-cpp-python's
Jinja2ChatFormatter, as create_chat_completion renders it) with the assistant turn opened by
"The special magic number for <city> is"; without a template, a plain instruction prompt. It is
decoded greedily for at most 16 tokens by llama-cpp-python on the patched library; the needle
counts as found when its number appears in the answer. Prompts depend only on the seed, the
length, the depth and the needle index, so every cache type answers the same prompts.

One Llama per (type pair, length): n_ctx = length + a small margin; lengths above the model's
training context (n_ctx_train) are skipped with a note. Results go to
<out-dir>/niah-<model>.{json,md,png} (one heat map per type pair: rows depth, columns length).

Prompts: niah_prompt.py; the results file: niah_results.py.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import REPO_ROOT, results, switches
from .arguments import int_arg, thread_count
from .cache_types import parse_type_specs
from .corpus import default_corpus, is_packaged
from .errors import UserError
from .gpu_split import add_split_arguments, check_split, command_parts, split_from_args
from .niah_prompt import ANSWER_PREFIX, INSTRUCTION, NEEDLE, QUESTION, VocabTokenizer, build_prompt, is_found, load_filler
from .niah_results import fmt_length, merge_runs, pair_key, recall, recall_by_length, render_heatmaps, render_markdown, results_name

DEFAULT_TYPES = "f16,q4_0,tq4,tq3,tq3/tq2"
DEFAULT_LENGTHS = "1k,2k,4k,8k"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1.0"
MAX_NEW_TOKENS = 16
CTX_MARGIN = 64          # n_ctx = length + CTX_MARGIN (>= MAX_NEW_TOKENS; llama.cpp pads it to 256)
N_BATCH = 512

# --- arguments ---------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,512,1.5k" -> [1024, 2048, 512, 1536] (k = 1024 tokens); order kept, duplicates dropped."""
    out: list[int] = []
    for item in (s.strip().lower() for s in (text or "").split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(k?)", item)
        if not m:
            raise UserError(f"bad length '{item}': use a token count such as 512, 1k (1024) or 1.5k")
        n = float(m.group(1)) * (1024 if m.group(2) else 1)
        if n != int(n) or n < 64:
            raise UserError(f"bad length '{item}': it must be a whole number of tokens, at least 64")
        if int(n) not in out:
            out.append(int(n))
    if not out:
        raise UserError("--lengths is empty; give token counts such as 1k,2k,4k")
    return out


def parse_depths(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]: where the needle goes, as a fraction of the haystack."""
    out: list[float] = []
    for item in (s.strip() for s in (text or "").split(",")):
        if not item:
            continue
        try:
            d = float(item[:-1]) / 100.0 if item.endswith("%") else float(item)
        except ValueError:
            raise UserError(f"bad depth '{item}': use a fraction between 0 and 1 (or a percentage such as 50%)") from None
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise UserError(f"bad depth '{item}': it must lie between 0 and 1")
        if d not in out:
            out.append(d)
    if not out:
        raise UserError("--depths is empty; give fractions such as 0,0.5,1")
    return out


def _command(args: argparse.Namespace, setting: dict, filler: Path) -> str:
    parts = ["tq", "eval", "niah", "--model", args.model, "--types", args.types, "--lengths", args.lengths,
             "--depths", args.depths, "--needles", str(args.needles), "--seed", str(args.seed),
             "--threads", str(args.threads)]
    if args.gpu_layers:
        parts += ["--gpu-layers", str(args.gpu_layers)]
    parts += command_parts(split_from_args(args))
    if args.filler or not is_packaged(filler):   # TQ_CORPUS as an argument: the command says which text
        parts += ["--filler", str(args.filler or filler)]
    if args.out_dir:
        parts += ["--out-dir", str(args.out_dir)]
    if args.append:
        parts.append("--append")
    if args.json:
        parts.append("--json")
    return results.command(parts, setting)


def _close(llm) -> None:
    close = getattr(llm, "close", None)
    if close is not None:
        close()


def run_niah(args: argparse.Namespace) -> dict:
    from .kv_shape import model_kv_shape
    from .llama_python import load_llama
    from .models import model_path

    t_start = time.time()
    pairs = parse_type_specs(args.types, DEFAULT_TYPES)
    split = split_from_args(args)
    check_split(split, args.gpu_layers != 0)
    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    path = model_path(args.model)
    label = results.model_label(args.model)
    shape = model_kv_shape(path)
    for k, v in pairs:
        try:
            shape.check_types(k, v)
        except UserError as exc:
            raise UserError(f"{label}: {exc}") from None
    filler_path = Path(args.filler) if args.filler else default_corpus()
    filler = load_filler(filler_path)
    setting = switches.apply_args(args)

    n_ctx_train = shape.n_ctx_train
    notes: list[str] = []
    skipped = [n for n in lengths if n_ctx_train and n > n_ctx_train]
    run_lengths = [n for n in lengths if n not in skipped]
    if skipped:
        notes.append(f"lengths {', '.join(fmt_length(n) for n in skipped)} skipped: above {label}'s training "
                     f"context (n_ctx_train {n_ctx_train}, its usable context)")
        for note in notes:
            print(f"tq: {note}", file=sys.stderr)
    if not run_lengths:
        raise UserError(f"every length is above {label}'s training context ({n_ctx_train} tokens)")

    tok = VocabTokenizer(path)
    try:
        fmt = tok.prompt_format()
        prompts = {(n, d, t): build_prompt(fmt, filler, n, d, args.seed, t)
                   for n in run_lengths for d in depths for t in range(args.needles)}
    finally:
        tok.close()
    stop = fmt.stop

    total = len(pairs) * len(prompts)
    bar = tqdm(total=total, desc=f"{label}: niah", unit="case", file=sys.stderr, dynamic_ncols=True)
    options = switches.option_kwargs(setting)
    cases: list[dict] = []
    failures: list[str] = []
    for k, v in pairs:
        for n in run_lengths:
            bar.set_description(f"{label}: {pair_key(k, v)} {fmt_length(n)}")
            n_ctx = n + CTX_MARGIN
            t_load = time.time()
            try:
                llm = load_llama(path, k, v, n_ctx=n_ctx, n_threads=args.threads, n_batch=min(N_BATCH, n_ctx),
                                 n_ubatch=min(N_BATCH, n_ctx), seed=args.seed, n_gpu_layers=args.gpu_layers,
                                 split_mode=split.mode, tensor_split=split.tensor_split, main_gpu=split.main_gpu,
                                 # every type's cache and attention on the CPU: TQ has CPU kernels only,
                                 # and the baselines then run the same attention code
                                 offload_kqv=False, **options)
            except (ValueError, RuntimeError) as exc:
                failures.append(f"{pair_key(k, v)} at n_ctx {n_ctx}: {exc}")
                bar.update(len(depths) * args.needles)
                continue
            load_s = time.time() - t_load
            try:
                for d in depths:
                    for t in range(args.needles):
                        p = prompts[(n, d, t)]
                        t0 = time.time()
                        out = llm.create_completion(prompt=p.tokens, max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                    top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                                    stop=stop or None, seed=args.seed)
                        answer = out["choices"][0]["text"]
                        found = is_found(answer, p.number)
                        cases.append({"k": k, "v": v, "length": n, "depth": d, "found": found,
                                      "answer": answer.strip(), "trial": t, "key": p.key, "number": p.number,
                                      "n_prompt_tokens": p.n_tokens, "depth_actual": round(p.depth_actual, 4),
                                      "filler_offset": p.offset, "n_ctx": n_ctx,
                                      "seconds": round(time.time() - t0, 2), "load_seconds": round(load_s, 2)})
                        bar.update(1)
                        bar.set_postfix_str(f"recall {recall(cases).get(pair_key(k, v), 0):.2f}")
            except (ValueError, RuntimeError) as exc:
                failures.append(f"{pair_key(k, v)} at length {n}: {exc}")
            finally:
                _close(llm)
                del llm
    bar.close()

    from .upstream import UPSTREAM

    data = {
        "command": _command(args, setting, filler_path),
        "date": results.now(),
        "model": label,
        "model_file": path.name,
        "n_ctx_train": n_ctx_train,
        "seed": args.seed,
        "settings": {
            "pairs": [pair_key(k, v) for k, v in pairs],
            "lengths": lengths, "lengths_run": run_lengths, "depths": depths, "needles": args.needles,
            "threads": args.threads, "max_new_tokens": MAX_NEW_TOKENS, "ctx_margin": CTX_MARGIN,
            "n_batch": N_BATCH, "decoding": "greedy (temperature 0, top_k 1, no repeat penalty)",
            "prompt_format": fmt.name, "filler": filler_path.name,
            "needle": NEEDLE, "question": QUESTION, "answer_prefix": ANSWER_PREFIX, "instruction": INSTRUCTION,
            "backend": "llama-cpp-python on the patched llama.cpp (CPU unless TQ_CUDA=1)",
            "gpu_layers": args.gpu_layers,
            "gpu_split": command_parts(split),
            "kv_cache_device": "CPU (every type)",
            "protect_layers": setting["protect_layers"],
            "key_center": "on" if setting["key_center"] else "off",
            "exact_sink": "on" if setting["exact_sink"] else "off",
        },
        "switches": switches.describe(setting),
        "skipped_lengths": skipped,
        "notes": notes,
        "recall": recall(cases),
        "recall_by_length": recall_by_length(cases),
        "cases": cases,
        "failures": failures,
        "seconds": round(time.time() - t_start, 1),
        "llama_cpp_commit": UPSTREAM.llama_cpp_commit,
    }
    out_dir = Path(args.out_dir) if args.out_dir else REPO_ROOT / "results"
    files = results.ResultFiles(out_dir, "niah-" + results_name(label, setting))
    old = results.load_json(files.json) if args.append else None
    if old is not None:
        data = merge_runs(old, data)
    written = results.write(files, data, render_markdown(label, data), lambda png: render_heatmaps(label, data, png))
    data["_paths"] = [str(p) for p in written]
    if failures:
        raise UserError(f"{len(failures)} run(s) failed (the others are in {out_dir}):\n" + "\n".join(failures))
    return data


def _cmd_niah(args: argparse.Namespace) -> int:
    data = run_niah(args)
    if args.json:
        print(json.dumps({"recall": data["recall"],
                          "cases": [{"k": c["k"], "v": c["v"], "length": c["length"], "depth": c["depth"],
                                     "found": c["found"], "answer": c["answer"]} for c in data["cases"]]},
                         indent=1, ensure_ascii=False))
    else:
        lengths = data["settings"]["lengths_run"]
        print(f"{'K/V':14s} {'recall':>6s}  " + "  ".join(f"{fmt_length(n):>5s}" for n in lengths))
        for key, r in data["recall"].items():
            by_len = data["recall_by_length"].get(key, {})
            print(f"{key:14s} {r:6.2f}  " + "  ".join(f"{by_len.get(fmt_length(n), float('nan')):5.2f}" for n in lengths))
        for note in data["notes"]:
            print(f"note: {note}")
        for p in data["_paths"]:
            print(p)
    return 0


def _eval_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ACTION subparsers of `tq eval` (made by evaluate.add_commands), or a new `eval`."""
    parser = sub.choices.get("eval")
    if parser is None:
        parser = sub.add_parser("eval", help="evaluate KV-cache types")
        esub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
        esub.required = True
        return esub
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    esub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    esub.required = True
    return esub


def add_commands(sub: argparse._SubParsersAction) -> None:
    esub = _eval_subparsers(sub)
    p = esub.add_parser(
        "niah",
        help="needle-in-a-haystack retrieval per KV-cache type (llama-cpp-python)",
        description="Hide a magic number in WikiText-2 filler at each depth, size the prompt to each length "
                    "in the model's tokens, ask for the number (greedy, chat template) and count how often "
                    "each K/V cache type finds it. Writes <out-dir>/niah-<model>.{json,png}.")
    p.add_argument("--model", "-m", required=True, help="model name (see `tq models list`) or a .gguf path")
    p.add_argument("--types", default=DEFAULT_TYPES,
                   help=f"comma-separated cache types: X means K = V = X, X/Y means K = X, V = Y (default {DEFAULT_TYPES})")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"prompt lengths in tokens, k = 1024 (default {DEFAULT_LENGTHS}); lengths above the "
                        "model's training context are skipped")
    p.add_argument("--depths", default=DEFAULT_DEPTHS,
                   help=f"needle depths, fractions of the haystack (default {DEFAULT_DEPTHS})")
    p.add_argument("--needles", type=int_arg(1, what="a needle count"), default=1, help="needles (prompts) per length and depth (default 1)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1, what="a seed"), default=0, help="seed of the needles and filler offsets (default 0)")
    p.add_argument("--threads", "-t", type=thread_count, default=1, help="CPU threads (default 1)")
    p.add_argument("--gpu-layers", "-ngl", type=int_arg(0, what="a layer count"), default=0,
                   help="layers whose weights go to the GPU (CUDA build; the KV cache and attention of every type "
                        "stay on the CPU, where the TQ kernels are; default 0)")
    add_split_arguments(p)
    p.add_argument("--filler", default=None,
                   help="filler text (default: TQ_CORPUS, else the packaged WikiText-2 raw test, wiki.test.raw)")
    p.add_argument("--json", action="store_true", help="print {recall, cases} as JSON")
    p.add_argument("--append", action="store_true",
                   help="add these cases to the model's results file (same needle settings), replacing the cases "
                        "of the same type, length, depth and needle: a long sweep can run in parts")
    p.add_argument("--out-dir", default=None, help="where niah-<model>.{json,png} go (default: results/)")
    switches.add_option_arguments(p)
    p.set_defaults(func=_cmd_niah)

