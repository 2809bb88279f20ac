"""`tq chat`: an interactive chat through llama-cpp-python on the patched library, with a TQ KV
cache; after each answer a line says how much KV memory the conversation holds against f16.

Ctrl-C while an answer streams stops that answer and keeps the session; Ctrl-C or EOF at the
prompt ends it (exit code 0). `/reset` forgets the conversation, `/quit` ends it.
"""

from __future__ import annotations

import argparse
import sys

from . import switches
from .errors import UserError
from .arguments import context_size, float_arg, int_arg, seed_value, thread_count
from .kv_memory import kv_bytes_for_tokens, kv_size
from .kv_shape import model_kv_shape
from .gpu_split import add_split_arguments, check_split, split_from_args
from .rpc import add_rpc_argument

HELP = "commands: /reset (forget the conversation), /quit (or Ctrl-D); Ctrl-C stops an answer"


def _fmt(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def kv_line(shape, ctk: str, ctv: str, n_tokens: int, n_ctx: int) -> str:
    used = kv_bytes_for_tokens(shape, ctk, ctv, n_tokens)
    f16 = kv_bytes_for_tokens(shape, "f16", "f16", n_tokens)
    alloc = kv_size(shape, ctk, ctv, n_ctx).total
    ratio = f"{f16 / used:.1f}x smaller" if used else "-"
    return (f"[KV {ctk}/{ctv}: {n_tokens} tokens in context, {_fmt(used)} (f16: {_fmt(f16)}, {ratio}); "
            f"{_fmt(alloc)} allocated for n_ctx {n_ctx}]")


def _stream_answer(llm, messages: list[dict], args: argparse.Namespace, out) -> tuple[str, bool]:
    """Stream one answer to out; returns (text, interrupted)."""
    parts: list[str] = []
    stream = llm.create_chat_completion(messages=messages, stream=True, max_tokens=args.max_tokens,
                                        temperature=args.temp, seed=args.seed)
    try:
        for chunk in stream:
            delta = chunk["choices"][0].get("delta", {})
            text = delta.get("content")
            if text:
                parts.append(text)
                out.write(text)
                out.flush()
    except KeyboardInterrupt:
        stream.close()
        return "".join(parts), True
    return "".join(parts), False


def _context_overflow(exc: Exception) -> bool:
    return "context window" in str(exc) or "exceed" in str(exc)


def tolerate_any_bytes(*streams) -> None:
    """Text streams that replace what they cannot decode or encode instead of raising: a pasted
    line in another encoding, or an answer in a script the terminal's encoding lacks, must not
    end the session with a traceback."""
    for stream in streams:
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def run_chat(args: argparse.Namespace, stdin=None, out=None, err=None) -> int:
    from .llama_python import load_llama

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    tolerate_any_bytes(stdin, out, err)
    split = split_from_args(args)
    check_split(split, args.gpu_layers != 0, bool(args.rpc))   # in the command line's words, before the load
    try:
        llm = load_llama(args.model, args.ctk, args.ctv, n_ctx=args.ctx, n_gpu_layers=args.gpu_layers,
                         n_threads=args.threads, seed=args.seed, rpc_servers=args.rpc, split_mode=split.mode,
                         tensor_split=split.tensor_split, main_gpu=split.main_gpu,
                         **switches.option_kwargs(switches.apply_args(args)))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    shape = model_kv_shape(args.model)
    n_ctx = llm.n_ctx()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = stdin.isatty()
    print(f"tq chat: {args.model}, KV cache {args.ctk}/{args.ctv}, n_ctx {n_ctx}. {HELP}", file=err)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:          # EOF
            if interactive:
                out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history.clear()
            llm.reset()
            print("[conversation reset]", file=err)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=err)
            continue
        history.append({"role": "user", "content": text})
        while True:
            try:
                answer, interrupted = _stream_answer(llm, system + history, args, out)
                break
            except ValueError as exc:
                # the conversation no longer fits n_ctx: forget the oldest exchange and retry
                if _context_overflow(exc) and len(history) > 2:
                    del history[:2]
                    print("[context full: dropped the oldest exchange]", file=err)
                    continue
                history.pop()
                print(f"\n[error: {exc}; /reset starts over]", file=err)
                answer, interrupted = None, False
                break
            except KeyboardInterrupt:   # before the first token (prompt processing)
                answer, interrupted = "", True
                break
        if answer is None:
            continue
        out.write("\n")
        if interrupted:
            print("[stopped]", file=err)
        history.append({"role": "assistant", "content": answer})
        print(kv_line(shape, args.ctk, args.ctv, llm.n_tokens, n_ctx), file=err)
        err.flush()


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat (llama-cpp-python) with a TQ KV cache")
    p.add_argument("--model", "-m", default="smollm2", help="model name from `tq models list`, or a .gguf path")
    p.add_argument("--ctk", default="tq3", help="K cache type (default tq3)")
    p.add_argument("--ctv", default="tq2", help="V cache type (default tq2)")
    p.add_argument("--ctx", "-c", type=context_size, default=4096, help="context length (default 4096)")
    p.add_argument("--gpu-layers", "-ngl", type=int_arg(0, also=(-1,), what="a layer count"), default=0,
                   help="layers to offload to the GPU (CUDA build; -1: all); with --rpc: the last N layers on the "
                        "RPC servers")
    add_rpc_argument(p)
    add_split_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", "-n", type=int_arg(1, what="a token count"), default=512,
                   help="longest answer in tokens (default 512)")
    p.add_argument("--temp", type=float_arg(0.0, what="a temperature"), default=0.7,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=seed_value, default=1)
    p.add_argument("--threads", "-t", type=thread_count, default=None,
                   help="CPU threads (default: half the cores)")
    switches.add_option_arguments(p)
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.threads is None:
        import os
        args.threads = max(1, (os.cpu_count() or 2) // 2)
    return run_chat(args)
