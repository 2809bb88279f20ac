"""`tq mem`: how much memory a KV cache takes, and the longest context that fits a budget, for a
model's GGUF metadata (kv_shape) and the way llama.cpp sizes its caches (kv_memory): server slots
(`--parallel`, `--kv-unified`) and sliding-window caches included."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import switches
from .arguments import context_size, float_arg, int_arg
from .cache_types import is_tq
from .errors import UserError
from .kv_memory import DEFAULT_BATCH, DEFAULT_UBATCH, Slots, bits_per_value, bytes_per_token, kv_size, max_ctx
from .kv_shape import HeadSizeError, KvShape, model_kv_shape

# The baselines `tq mem` always compares (as K/V pairs with the same type for K and V).
BASELINES = ("f16", "q8_0", "q4_0")
DEFAULT_BUDGET_GIB = 8.0


def server_slots(n_ctx: int, parallel: int | None, extra: list[str] = (), n_ubatch: int = DEFAULT_UBATCH) -> Slots:
    """The cell layout llama-server makes of `-c n_ctx` with `--parallel` (None: not given) and
    its other arguments: without --parallel it picks 4 slots and a unified cache (server.cpp),
    with it one stream per slot unless -kvu/--kv-unified is given; --swa-full as given."""
    extra = list(extra)
    unified = parallel is None or bool({"-kvu", "--kv-unified"} & set(extra))
    if {"-no-kvu", "--no-kv-unified"} & set(extra):
        unified = False
    return Slots(n_ctx, 4 if parallel is None else parallel, unified, n_ubatch=n_ubatch,
                 swa_full="--swa-full" in extra)


def allocation_summary(shape: KvShape, ctk: str, ctv: str, slots: Slots, protect: int | None = None) -> str:
    """One line on the KV cache llama.cpp allocates for a context of this layout, against f16
    (what `tq serve` and `tq chat` print)."""
    size = kv_size(shape, ctk, ctv, slots, protect=protect)
    f16 = kv_size(shape, "f16", "f16", slots, protect=protect)
    if slots.n_seq == 1:
        layout = f"n_ctx {slots.n_ctx}"
    elif slots.unified:
        layout = f"{slots.n_seq} slots sharing {size.cells} cells"
    else:
        layout = f"{slots.n_seq} slots of {size.cells} cells"
    return (f"KV cache {ctk}/{ctv}: {_fmt_bytes(size.total)} allocated for {layout} "
            f"(f16: {_fmt_bytes(f16.total)}, {f16.total / size.total:.2f}x smaller)")


def report(model: str | Path, n_ctx: int, ctk: str, ctv: str, budget_gib: float = DEFAULT_BUDGET_GIB,
           n_ubatch: int = DEFAULT_UBATCH, protect: int | None = None, n_seq: int = 1, unified: bool = False,
           swa_full: bool = False, n_batch: int = DEFAULT_BATCH) -> dict:
    protect = int(switches.from_env()["protect_layers"]) if protect is None else max(0, protect)
    shape = model_kv_shape(model)
    shape.check_types(ctk, ctv)
    slots = Slots(n_ctx, n_seq, unified, n_ubatch, n_batch, swa_full)
    size = kv_size(shape, ctk, ctv, slots, protect=protect)
    f16 = kv_size(shape, "f16", "f16", slots, protect=protect)
    budget = int(budget_gib * (1 << 30))
    pairs = {b: (b, b) for b in BASELINES}
    pairs[f"{ctk}/{ctv}"] = (ctk, ctv)
    fits = {}
    for name, (k, v) in pairs.items():
        try:
            shape.check_types(k, v)
        except HeadSizeError:
            fits[name] = None     # the type cannot serve this model's head size
            continue
        fits[name] = max_ctx(shape, k, v, budget, slots, protect=protect)
    return {
        "model": str(model), "arch": shape.arch, "ctk": ctk, "ctv": ctv,
        "n_ctx": n_ctx, "n_ctx_cells": size.cells, "n_ctx_train": shape.n_ctx_train,
        "n_seq": n_seq, "kv_unified": unified, "n_stream": size.n_stream, "swa_full": swa_full,
        "n_layers_kv": len(shape.layers), "n_swa": shape.n_swa,
        "protect_layers": protect if (is_tq(ctk) or is_tq(ctv)) else 0,
        "bits_per_value": bits_per_value(shape, ctk, ctv, protect),
        "kv_bytes_per_token": bytes_per_token(shape, ctk, ctv, protect),
        "kv_bytes_per_token_f16": bytes_per_token(shape, "f16", "f16"),
        "kv_bytes_total": size.total, "k_bytes_total": size.k_bytes, "v_bytes_total": size.v_bytes,
        "k_mib": size.k_bytes / 2**20, "v_mib": size.v_bytes / 2**20,
        "f16_bytes_total": f16.total, "ratio_vs_f16": f16.total / size.total,
        "layer_types": size.groups,
        "budget_gib": budget_gib, "budget_bytes": budget,
        "max_ctx": fits,
        "notes": shape.notes,
    }


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _print_report(r: dict) -> None:
    pair = f"{r['ctk']}/{r['ctv']}"
    print(f"{r['model']} ({r['arch']}, {r['n_layers_kv']} layers with a KV cache"
          + (f", sliding window {r['n_swa']}" if r["n_swa"] else "") + ")")
    layout = f"{r['n_ctx_cells']} cells"
    if r["n_seq"] > 1:
        layout = (f"{r['n_seq']} sequences sharing {r['n_ctx_cells']} cells" if r["kv_unified"] else
                  f"{r['n_seq']} sequences of {r['n_ctx_cells']} cells each")
    print(f"KV cache {pair} at n_ctx {r['n_ctx']} ({layout}):")
    print(f"  per token: {r['kv_bytes_per_token']} B ({r['kv_bytes_per_token_f16']} B with f16)")
    print(f"  total:     {_fmt_bytes(r['kv_bytes_total'])} (K {r['k_mib']:.2f} MiB + V {r['v_mib']:.2f} MiB); "
          f"f16: {_fmt_bytes(r['f16_bytes_total'])}, {r['ratio_vs_f16']:.2f}x smaller")
    if r["protect_layers"]:
        print(f"  the first and last {r['protect_layers']} layer(s) keep a q8_0 cache (--tq-protect-layers; 0 turns it off): "
              f"{r['bits_per_value']:.2f} bits per value on average")
    for g in r["layer_types"]:
        print(f"  {g['layers']:3d} {g['kind']:4s} layers ({g['k_type']}/{g['v_type']}): "
              f"{g['n_head_kv']} kv heads x head_dim {g['head_dim_k']}/{g['head_dim_v']}, "
              f"{g['cells']} cells in all, K {g['k_bytes_per_token_per_layer']} B + V {g['v_bytes_per_token_per_layer']} B "
              f"per token per layer, {_fmt_bytes(g['k_bytes'] + g['v_bytes'])}")
    step = "256" if r["n_seq"] == 1 or r["kv_unified"] else f"{r['n_seq']} x 256"
    print(f"Longest context for a KV budget of {r['budget_gib']:g} GiB (multiples of {step}, as llama.cpp pads):")
    for name, n in r["max_ctx"].items():
        if n is None:
            print(f"  {name:14s} cannot serve this model's head size")
            continue
        over = f"  (beyond the trained context {r['n_ctx_train']})" if r["n_ctx_train"] and n > r["n_ctx_train"] else ""
        print(f"  {name:14s} {n:>12,d} tokens{over}")
    for note in r["notes"]:
        print(f"note: {note}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mem", help="KV cache memory per token and in total, and the longest context that fits a budget")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--ctx", "-c", type=context_size, default=4096, help="context length (default 4096), all slots together")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--budget-gib", type=float_arg(0.0, what="a memory size in GiB"), default=DEFAULT_BUDGET_GIB,
                   help=f"memory for the KV cache, GiB (default {DEFAULT_BUDGET_GIB:g}: what is left for the "
                        "cache on a 12-16 GB GPU after a small model's weights)")
    p.add_argument("--parallel", "-np", type=int_arg(1, what="a slot count"), default=1,
                   help="sequences (llama-server slots, `tq serve --parallel`; default 1): each gets its own "
                        "ctx/parallel cells and its own sliding-window cache unless --kv-unified")
    p.add_argument("--kv-unified", "-kvu", action="store_true",
                   help="one cache shared by all sequences (llama.cpp --kv-unified; what llama-server picks "
                        "when it is not given --parallel: 4 slots, unified)")
    p.add_argument("--swa-full", action="store_true", help="full-size sliding-window caches (llama.cpp --swa-full)")
    p.add_argument("--ubatch", type=int_arg(1, what="a batch size"), default=DEFAULT_UBATCH, help="n_ubatch (sizes SWA caches; default 512)")
    p.add_argument("--batch", type=int_arg(1, what="a batch size"), default=DEFAULT_BATCH, help="n_batch (caps n_ubatch; default 2048)")
    p.add_argument("--protect-layers", type=int_arg(0, what="a layer count"), default=None, metavar="N", dest="protect_layers",
                   help="the same as --tq-protect-layers")
    switches.add_option_arguments(p, ("protect_layers",))   # the other options do not change the size
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_mem)


def _cmd_mem(args: argparse.Namespace) -> int:
    if args.budget_gib == 0:
        raise UserError("--budget-gib must be more than 0")
    if args.protect_layers is not None and args.tq_protect_layers is None:
        args.tq_protect_layers = args.protect_layers
    setting = switches.apply_args(args)
    r = report(args.model, args.ctx, args.ctk, args.ctv, args.budget_gib, args.ubatch, int(setting["protect_layers"]),
               args.parallel, args.kv_unified, args.swa_full, args.batch)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        _print_report(r)
    return 0
