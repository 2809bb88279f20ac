"""`tq bench`: decode and prompt speed of cache types with llama-bench, all pairs in one run on
one build, written to results/ as JSON, a Markdown table with ratios, and a plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from shlex import quote as shlex_quote
from typing import Mapping

from tqdm import tqdm

from . import REPO_ROOT, fattn_perf, random_gguf, results, switches
from .arguments import int_arg, thread_count
from .build import find_binary
from .cache_types import parse_type_specs
from .errors import UserError
from .gpu_split import add_split_arguments, check_split, command_parts, split_from_args
from .gpu_split import llama_args as split_args
from .kv_memory import bits_per_value
from .kv_shape import model_kv_shape
from .models import model_path
from .upstream import UPSTREAM

DEFAULT_TYPES = "f16,q8_0,q4_0,tq4,tq3,tq3/tq2"
GPU_TYPES = "f16,q8_0,q4_0,tq4,tq3,tq3/tq2,tq2"
GPU_DEPTHS = "0,8192,32768,65536"
GPU_MODEL = "llama-3.1-8b"


def parse_depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise UserError(f"--depths '{text}': give comma-separated token counts such as 0,4096") from None
    if not depths or min(depths) < 0:
        raise UserError(f"--depths '{text}': give comma-separated token counts of 0 or more")
    return depths


def run_llama_bench(model: Path, k: str, v: str, depths: list[int], n_gen: int, n_prompt: int, threads: int,
                    reps: int, cuda: bool, extra: list[str], setting: Mapping[str, switches.Value]) -> list[dict]:
    exe = find_binary("llama-bench", cuda)
    cmd = [str(exe), "-m", str(model), "-fa", "1", "-ctk", k, "-ctv", v, "-t", str(threads), "-r", str(reps),
           "-n", str(n_gen), "-p", str(n_prompt), "-d", ",".join(map(str, depths)), "-o", "json"] + \
        switches.llama_args(setting, model, k, max(depths) + n_prompt + n_gen) + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=switches.child_env(setting))
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
        raise UserError(f"llama-bench failed for {k}/{v} (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout)


def _failure_reason(err: UserError) -> str:
    """The line of a failed llama-bench's output that says what went wrong: out of memory first, then an
    error or failure (else its last line)."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    for words in (("out of memory",), ("error", "failed", "unsupported", "not supported")):
        for line in reversed(lines):
            if any(word in line.lower() for word in words):
                return line
    return lines[-1] if lines else str(err).splitlines()[0]


def bench(model: str, pairs: list[tuple[str, str]], depths: list[int], n_gen: int, n_prompt: int, threads: int,
          reps: int, cuda: bool, extra: list[str], setting: Mapping[str, switches.Value] | None = None
          ) -> tuple[list[dict], list[dict]]:
    """The rows of every (pair, test, depth) measured, and the cells that could not be: a pair whose
    llama-bench run fails (a 64K f16 cache that does not fit a GPU's memory) is run again one depth at a
    time, so that its other depths are kept; each depth that still fails is a failure {k, v, depth, error}."""
    setting = switches.from_env() if setting is None else setting
    protect = int(setting["protect_layers"])
    rows, failures = [], []
    path = model_path(model)
    shape = model_kv_shape(path)
    for k, v in pairs:
        shape.check_types(k, v)

    def run(k: str, v: str, ds: list[int]) -> list[dict]:
        return run_llama_bench(path, k, v, ds, n_gen, n_prompt, threads, reps, cuda, extra, setting)

    for k, v in tqdm(pairs, desc="llama-bench", unit="pair", file=sys.stderr):
        try:
            results_kv = run(k, v, depths)
        except UserError as err:
            results_kv, failed = [], []
            if len(depths) == 1:
                failed.append((depths[0], err))
            else:
                for d in depths:
                    try:
                        results_kv += run(k, v, [d])
                    except UserError as e:
                        failed.append((d, e))
            for d, e in failed:
                failures.append({"k": k, "v": v, "depth": d, "error": _failure_reason(e)})
                print(f"tq bench: {k}/{v} at depth {d} not measured: {failures[-1]['error']}", file=sys.stderr)
        for r in results_kv:
            test = "tg" if r.get("n_gen", 0) > 0 else "pp"
            rows.append({"k": k, "v": v, "test": test, "n": r["n_gen"] if test == "tg" else r["n_prompt"],
                         "depth": r.get("n_depth", 0), "tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"],
                         "bpv": bits_per_value(shape, k, v, protect), "protect_layers": protect,
                         "backend": r.get("backends", ""),
                         "cpu": r.get("cpu_info", ""), "gpu": r.get("gpu_info", "")})
    if not rows:
        first = failures[0]
        raise UserError(f"llama-bench measured nothing: {first['k']}/{first['v']} at depth {first['depth']}: {first['error']}")
    return rows, failures


def _ratio_table(rows: list[dict]) -> list[str]:
    lines = ["| K/V | bits/value | test | depth | tokens/s | vs f16 | vs q8_0 | vs q4_0 |", "|---|---|---|---|---|---|---|---|"]
    ref = {(r["k"], r["v"], r["test"], r["depth"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        key = (r["test"], r["depth"])
        ratios = []
        for base in ("f16", "q8_0", "q4_0"):
            b = ref.get((base, base) + key)
            ratios.append(f"{r['tokens_per_s'] / b:.2f}x" if b else "-")
        run = f" ({r['run']})" if "run" in r else ""
        lines.append(f"| {r['k']}/{r['v']}{run} | {r['bpv']:.2f} | {r['test']}{r['n']} | {r['depth']} | "
                     f"{r['tokens_per_s']:.1f} ± {r['stddev']:.1f} | " + " | ".join(ratios) + " |")
    return lines


def _plot(rows: list[dict], title: str, out: Path) -> None:
    plt = results.pyplot()

    tests = sorted({(r["test"], r["depth"]) for r in rows})
    pairs = list(dict.fromkeys(f"{r['k']}/{r['v']}" for r in rows))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 4), squeeze=False)
    for ax, (test, depth) in zip(axes[0], tests):
        vals = {f"{r['k']}/{r['v']}": r["tokens_per_s"] for r in rows if (r["test"], r["depth"]) == (test, depth)}
        names = [p for p in pairs if p in vals]
        colors = ["tab:orange" if p.startswith("tq") or "/tq" in p else "tab:gray" for p in names]
        ax.bar(range(len(names)), [vals[p] for p in names], color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{'decode' if test == 'tg' else 'prompt'} at depth {depth}")
        ax.set_ylabel("tokens/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_results(rows: list[dict], model: str, tag: str, command: str, out_dir: Path,
                  setting: Mapping[str, switches.Value] | None = None, merged_from: list[dict] | None = None,
                  failures: list[dict] | None = None) -> Path:
    """merged_from: the runs a `tq bench --merge` table comes from (their meta); their switches are the table's.
    failures: the cells bench() could not measure, listed under the table with llama-bench's reason."""
    setting = switches.from_env() if setting is None else setting
    files = results.ResultFiles(out_dir, f"bench-{tag}-{results.safe_name(model)}")
    meta = {"command": command, "date": results.now(),
            "switches": merged_from[0]["switches"] if merged_from else switches.describe(setting),
            "llama_cpp_commit": UPSTREAM.llama_cpp_commit, "machine": platform.platform(),
            "cpu": rows[0]["cpu"] if rows else "", "gpu": rows[0]["gpu"] if rows else ""}
    md = [f"# llama-bench, {model}, {tag}", "", f"Made by `{command}` on {meta['date']}.", ""]
    if merged_from:
        meta["merged_from"] = merged_from
        md += ["Merged from these runs (rows marked with the run's number; each ratio is to the f16, q8_0 and q4_0 "
               "rows of the same test and depth, whichever run measured them):", ""]
        md += [f"{i + 1}. `{m['command']}` on {m['date']}" for i, m in enumerate(merged_from)] + [""]
    md += [f"CPU: {meta['cpu']}  GPU: {meta['gpu'] or '-'}", ""] + _ratio_table(rows) + [""]
    if failures:
        meta["failed"] = failures
        md += ["Not measured (llama-bench failed; its other depths were run one at a time):", ""]
        md += [f"- {f['k']}/{f['v']} at depth {f['depth']}: {f['error']}" for f in failures] + [""]
    results.write(files, {"meta": meta, "rows": rows}, "\n".join(md), lambda png: _plot(rows, f"{model} ({tag})", png))
    return out_dir / files.stem


def merge_runs(paths: list[Path]) -> tuple[list[dict], str, list[dict]]:
    """The rows of several `tq bench` results files as one table (for a bench split over calls that cannot hold
    it whole): its rows ordered by pair as the runs first give them, then test and depth, each row marked with its
    run (1, 2, ...); the model label; the runs' meta. The runs must share the model, the machine's CPU and GPU,
    the llama.cpp commit and the switches, and measure each (pair, test, depth) once."""
    import shlex

    if len(paths) < 2:
        raise UserError("--merge takes two or more results files of `tq bench` (bench-*.json)")
    metas, rows, model, first, failed = [], [], None, None, []
    for i, path in enumerate(paths):
        try:
            data = json.loads(Path(path).read_text())
            meta, run_rows = data["meta"], data["rows"]
            words = shlex.split(meta["command"])
            run_model = results.model_label(words[words.index("--model") + 1])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"{path}: not a results file of `tq bench` ({e.__class__.__name__}: {e})") from None
        if model is not None and run_model != model:
            raise UserError(f"{path}: model {run_model}, where {paths[0]} has {model}: a merged table is of one model")
        model = run_model
        first = first or meta
        for key in ("cpu", "gpu", "llama_cpp_commit", "switches"):
            if meta.get(key) != first.get(key):
                raise UserError(f"{path}: {key} {meta.get(key)!r}, where {paths[0]} has {first.get(key)!r}: "
                                "merge only runs of one build on one machine with the same switches")
        metas.append({k: meta.get(k) for k in ("command", "date", "switches")})
        failed += [dict(f, run=i + 1) for f in meta.get("failed") or []]
        rows += [dict(r, run=i + 1) for r in run_rows]
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r["k"], r["v"], r["test"], r["depth"])
        if key in seen:
            raise UserError(f"{r['k']}/{r['v']} {r['test']} at depth {r['depth']} is in run {seen[key]} and run {r['run']}: "
                            "a merged table takes each measurement once")
        seen[key] = r["run"]
    order = list(dict.fromkeys((r["k"], r["v"]) for r in rows))
    rows.sort(key=lambda r: (order.index((r["k"], r["v"])), r["test"] != "pp", r["depth"]))
    # a cell one run could not measure stays listed unless another run measured it
    measured = {(r["k"], r["v"], r["depth"]) for r in rows}
    for run, m in enumerate(metas, 1):
        m["failed"] = [f for f in failed if f["run"] == run and (f["k"], f["v"], f["depth"]) not in measured]
    return rows, model, metas


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="llama-bench speed of cache types against f16/q8_0/q4_0, written to results/")
    p.add_argument("--model", "-m", default=None, help="default smollm2 (--gpu: the random-weight model)")
    p.add_argument("--types", default=None,
                   help=f"comma-separated cache types: X means K = V = X, X/Y means K = X, V = Y (default {DEFAULT_TYPES})")
    p.add_argument("--depths", default=None, help="comma-separated context depths (default 0,4096)")
    p.add_argument("--n-gen", type=int_arg(0, what="a token count"), default=32)
    p.add_argument("--n-prompt", type=int_arg(0, what="a token count"), default=None, help="default 0 (--gpu: 512)")
    p.add_argument("--threads", "-t", type=thread_count, default=min(os.cpu_count() or 2, 16))
    p.add_argument("--reps", "-r", type=int_arg(1, what="a repetition count"), default=3)
    p.add_argument("--cuda", action="store_true", help="use the CUDA build")
    p.add_argument("--gpu", action="store_true",
                   help=f"the GPU benchmark: the CUDA build, all layers and the cache on the GPU (-ngl 99), a random-weight "
                        f"Q4_0 GGUF of {GPU_MODEL}'s shape made on first use, types {GPU_TYPES}, depths {GPU_DEPTHS}, pp512; "
                        "key centering off (random weights have no mean key; its cost is one subtraction per K row)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="also time decoding attention alone (test-backend-ops perf, one token, Llama-3.1-8B's heads, "
                        "8K/32K/64K cells) and its bandwidth against a 256 MiB copy on the same device, written to "
                        "attention-TAG.json/.md/.png (default: on with --gpu)")
    add_split_arguments(p, needs="--gpu or --cuda")
    p.add_argument("--tag", default=None, help="name part of the results files (default cpu, cuda or gpu)")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--merge", nargs="+", type=Path, metavar="BENCH_JSON", default=None,
                   help="measure nothing: merge these results files of earlier runs (one build, one machine) into one "
                        "table and plot, bench-TAG-MODEL.* (default tag: merged)")
    switches.add_option_arguments(p)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-bench arguments")
    p.set_defaults(func=_cmd)


def _command(args: argparse.Namespace, extra: list[str], setting: Mapping[str, switches.Value]) -> str:
    """The command that makes these results, from the parsed arguments (as `tq eval niah` records it)."""
    parts = ["tq", "bench", "--model", args.model, "--types", args.types, "--depths", args.depths,
             "--n-gen", str(args.n_gen), "--n-prompt", str(args.n_prompt), "--threads", str(args.threads),
             "--reps", str(args.reps)]
    if args.gpu:
        parts.append("--gpu")
    elif args.cuda:
        parts.append("--cuda")
    parts += command_parts(split_from_args(args))
    if args.tag:
        parts += ["--tag", args.tag]
    if args.attention is not None and args.attention != args.gpu:
        parts.append("--attention" if args.attention else "--no-attention")
    command = results.command(parts, setting)
    return command + (" -- " + " ".join(map(shlex_quote, extra)) if extra else "")


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on --gpu: the CUDA build, the random 8B-shaped model, the GPU types,
    depths and pp512, where the command line gives none."""
    if args.gpu:
        args.cuda = True
    if args.model is None:
        args.model = str(random_gguf.cached(GPU_MODEL)) if args.gpu else "smollm2"
    if args.types is None:
        args.types = GPU_TYPES if args.gpu else DEFAULT_TYPES
    if args.depths is None:
        args.depths = GPU_DEPTHS if args.gpu else "0,4096"
    if args.n_prompt is None:
        args.n_prompt = 512 if args.gpu else 0


def _merge_cmd(args: argparse.Namespace) -> int:
    rows, model, metas = merge_runs(args.merge)
    command = "tq bench --merge " + " ".join(shlex_quote(str(p)) for p in args.merge) + \
        (f" --tag {shlex_quote(args.tag)}" if args.tag else "")
    stem = write_results(rows, model, args.tag or "merged", command, args.out_dir, merged_from=metas,
                         failures=[f for m in metas for f in m["failed"]])
    print(json.dumps(rows, indent=1) if args.json else "\n".join(_ratio_table(rows)))
    print(f"\nwritten: {stem}.json, .md, .png", file=sys.stderr)
    return 0


def _cmd(args: argparse.Namespace) -> int:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.merge:
        if extra or args.gpu or args.cuda or args.attention or any(
                getattr(args, a) is not None for a in ("model", "types", "depths", "n_prompt")) or any(
                getattr(args, s.flag[2:].replace("-", "_"), None) is not None for s in switches.OPTIONS) or \
                split_from_args(args).given():
            raise UserError("--merge measures nothing: give it the results files and at most --tag/--out-dir/--json")
        return _merge_cmd(args)
    _fill_defaults(args)
    split = split_from_args(args)
    # llama-bench offloads every layer by default: the CUDA build is what gives the split its GPUs
    check_split(split, args.cuda, offload_hint="add --gpu (or --cuda)")
    setting = switches.apply_args(args)
    if args.gpu and random_gguf.is_random(args.model):
        setting = dict(setting, key_center=False)
    # --gpu: every layer and its cache on the GPU; and how GPUs share them (neither is part of the
    # recorded command's `--` arguments)
    offload = (["-ngl", "99"] if args.gpu else []) + split_args(split, bench=True)
    rows, failures = bench(args.model, parse_type_specs(args.types, DEFAULT_TYPES), parse_depths(args.depths),
                           args.n_gen, args.n_prompt, args.threads, args.reps, args.cuda, extra + offload, setting)
    tag = args.tag or ("gpu" if args.gpu else "cuda" if args.cuda else "cpu")
    stem = write_results(rows, results.model_label(args.model), tag,
                         _command(args, extra, setting), args.out_dir, setting, failures=failures)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("\n".join(_ratio_table(rows)))
    print(f"\nwritten: {stem}.json, .md, .png", file=sys.stderr)
    if args.gpu if args.attention is None else args.attention:
        pairs = parse_type_specs(args.types, DEFAULT_TYPES)
        depths = [d for d in parse_depths(args.depths) if d in fattn_perf.PERF_DEPTHS] or list(fattn_perf.PERF_DEPTHS)
        print("test-backend-ops perf: decoding attention alone and a 256 MiB copy ...", file=sys.stderr)
        times, copy_gbs = fattn_perf.measure(pairs, depths, args.cuda, "CUDA0" if args.cuda else "CPU")
        device = (rows[0]["gpu"] if args.cuda else rows[0]["cpu"]) if rows else ""
        stem = fattn_perf.write_results(times, copy_gbs, device, tag, _command(args, extra, setting), args.out_dir)
        print("\n".join(fattn_perf.table(times, copy_gbs)), file=sys.stderr if args.json else sys.stdout)
        print(f"\nwritten: {stem}.json, .md, .png", file=sys.stderr)
    if failures:
        print(f"tq bench: {len(failures)} of {len(failures) + len({(r['k'], r['v'], r['depth']) for r in rows})} "
              "(pair, depth) cells not measured: listed in the results' Markdown and JSON (\"failed\")", file=sys.stderr)
        return 1
    return 0
