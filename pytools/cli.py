"""The `tq` command line. Each module adds its own subcommands through `add_commands`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from . import (bench, build, calibrate, chat, codebook, distortion, evaluate, fake_keys, generate, header, llama_python,
                   mem, models, niah, roundtrip, rpc, serve, upstream)

    parser = argparse.ArgumentParser(
        prog="tq", description="TurboQuant KV caches for llama.cpp: build, check and evaluate."
    )
    parser.add_argument("--version", action="version", version=f"tq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (codebook, distortion, header, upstream, build, models, calibrate, roundtrip, generate, bench, evaluate,
                   llama_python, chat, serve, rpc, mem, niah, fake_keys):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tq: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"tq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
