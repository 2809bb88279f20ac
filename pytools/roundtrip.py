"""`tq roundtrip`: quantize and dequantize the rows of a float32 array with the C library or the
NumPy reference."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .errors import UserError
from .layout import QK_TQ, TQ_TYPES


def roundtrip(x: np.ndarray, type_name: str, impl: str) -> np.ndarray:
    if type_name not in TQ_TYPES:
        raise UserError(f"unknown TQ type '{type_name}'; known: {', '.join(TQ_TYPES)}")
    if x.ndim != 2 or x.shape[1] % QK_TQ:
        raise UserError(f"expected a 2-D array whose row length is a multiple of {QK_TQ}, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if impl == "numpy":
        from .layout import dequantize_rows, quantize_rows
        return dequantize_rows(quantize_rows(x, type_name), type_name)
    if impl == "c":
        from .ggml_lib import load
        lib = load()
        return lib.dequantize_rows(lib.quantize_rows(x, type_name), type_name, x.shape[1])
    raise UserError(f"--impl must be c or numpy, not {impl}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("roundtrip", help="quantize and dequantize the rows of a float32 .npy array")
    p.add_argument("--type", required=True, choices=sorted(TQ_TYPES))
    p.add_argument("--impl", choices=("c", "numpy"), default="c")
    p.add_argument("--in", dest="inp", type=Path, required=True, help="float32 .npy, rows of a multiple of 64 values")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if not args.inp.exists():
        raise UserError(f"{args.inp} does not exist")
    x = np.load(args.inp)
    y = roundtrip(x, args.type, args.impl)
    np.save(args.out, y)
    err = float(np.mean(np.sum((x - y) ** 2, axis=1) / np.maximum(np.sum(x.astype(np.float64) ** 2, axis=1), 1e-30)))
    print(f"{args.type} ({args.impl}): {x.shape[0]} rows, mean relative squared error {err:.5f} -> {args.out}")
    return 0
