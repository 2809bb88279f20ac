"""ctypes access to the built ggml libraries: the TQ types through ggml's own type traits (what
llama.cpp calls), and each CPU SIMD path through the exported tq_cpu_* functions."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .cache_types import CACHE_TYPES
from .errors import UserError

# enum ggml_type ids: the cache types, plus the query-side types of the TQ keys (patches/0001)
GGML_TYPE_IDS = {name: t.ggml_id for name, t in CACHE_TYPES.items()} | {"tq_q": 49, "tq_qjl_q": 50}

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                              ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _TypeTraitsCpu(ctypes.Structure):
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


class _QuantizeOptions(ctypes.Structure):  # tq_quantize_options (ggml_tq/tq.h)
    _fields_ = [("norm_correction", ctypes.c_bool), ("scale_search", ctypes.c_bool)]


@dataclass
class GgmlLib:
    base: ctypes.CDLL
    cpu: ctypes.CDLL

    def traits(self, type_name: str) -> _TypeTraits:
        return self.base.ggml_get_type_traits(GGML_TYPE_IDS[type_name]).contents

    def traits_cpu(self, type_name: str) -> _TypeTraitsCpu:
        return self.cpu.ggml_get_type_traits_cpu(GGML_TYPE_IDS[type_name]).contents

    def row_bytes(self, type_name: str, n: int) -> int:
        t = self.traits(type_name)
        if n % t.blck_size:
            raise UserError(f"row length {n} is not a multiple of {type_name}'s block size {t.blck_size}")
        return n // t.blck_size * t.type_size

    def quantize_rows(self, x: np.ndarray, type_name: str, cpu: bool = False, norm_correction: bool = True,
                      scale_search: bool = True) -> np.ndarray:
        """Rows of float32 -> bytes, through the reference quantizer (from_float_ref) or the CPU
        backend's from_float (what SET_ROWS uses). norm_correction / scale_search False: the
        reference's measurement variants (tq_quantize_row_with), as layout.quantize_rows takes them."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, self.row_bytes(type_name, n)), dtype=np.uint8)
        if not (norm_correction and scale_search):
            if cpu:
                raise UserError("the CPU quantizer is the product's; its variants come from TQ_NORM_CORRECTION / "
                                "TQ_SCALE_SEARCH in the environment")
            fn = self.base.tq_quantize_row_with
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
            opts = _QuantizeOptions(norm_correction, scale_search)
            for r in range(rows):
                fn(GGML_TYPE_IDS[type_name], x[r].ctypes.data, out[r].ctypes.data, n, ctypes.byref(opts))
            return out
        ptr = self.traits_cpu(type_name).from_float if cpu else self.traits(type_name).from_float_ref
        fn = _from_float_t(ptr)
        for r in range(rows):
            fn(x[r].ctypes.data, out[r].ctypes.data, n)
        return out

    def dequantize_rows(self, raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.zeros((raw.shape[0], n), dtype=np.float32)
        fn = _to_float_t(self.traits(type_name).to_float)
        for r in range(raw.shape[0]):
            fn(raw[r].ctypes.data, out[r].ctypes.data, n)
        return out

    def vec_dot_rows(self, raw_k: np.ndarray, q: np.ndarray, type_name: str) -> np.ndarray:
        """ggml's vec_dot of each key row with the matching query row (query converted once per row to
        the key type's vec_dot_type, as flash attention does)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        tc = self.traits_cpu(type_name)
        qtype = {v: k for k, v in GGML_TYPE_IDS.items()}[tc.vec_dot_type]
        conv = _from_float_t(self.traits_cpu(qtype).from_float)
        dot = _vec_dot_t(tc.vec_dot)
        n = q.shape[1]
        qbuf = np.zeros(self.row_bytes(qtype, n), dtype=np.uint8)
        out = np.zeros(q.shape[0], dtype=np.float32)
        res = ctypes.c_float()
        raw_k = np.ascontiguousarray(raw_k, dtype=np.uint8)
        for r in range(q.shape[0]):
            conv(q[r].ctypes.data, qbuf.ctypes.data, n)
            dot(n, ctypes.addressof(res), 0, raw_k[r].ctypes.data, 0, qbuf.ctypes.data, 0, 1)
            out[r] = res.value
        return out

    def mad_rotated(self, raw: np.ndarray, type_name: str, n: int, scales: np.ndarray,
                    exact: np.ndarray | None = None, exact_scale: float = 0.0) -> np.ndarray:
        """sum_r scales[r] * decode_rotated(row r), rotated back once: the CPU flash-attention V path;
        with exact, exact_scale * exact (a float32 row, the exact sink's V) joins the accumulator first."""
        acc = np.zeros(n, dtype=np.float32)
        if exact is not None:
            tmp = np.zeros(n, dtype=np.float32)
            exact = np.ascontiguousarray(exact, dtype=np.float32)
            self.cpu.tq_cpu_mad_f32_rotated(n, acc.ctypes.data, exact.ctypes.data, tmp.ctypes.data,
                                            ctypes.c_float(exact_scale))
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        for r in range(raw.shape[0]):
            self.cpu.tq_cpu_mad_rotated(GGML_TYPE_IDS[type_name], n, acc.ctypes.data, raw[r].ctypes.data,
                                        ctypes.c_float(float(scales[r])))
        self.cpu.tq_cpu_unrotate_row(acc.ctypes.data, n)
        return acc

    def set_simd_level(self, level: int) -> int:
        return self.cpu.tq_cpu_set_simd_level(level)

    def simd_name(self) -> str:
        return self.cpu.tq_cpu_simd_name().decode()


def _lib_file(directory: Path, stem: str) -> Path:
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (directory / name).exists():
            return directory / name
    raise UserError(f"lib{stem} not found in {directory}: run `tq build` first (or set TQ_BIN_DIR)")


@lru_cache(maxsize=None)
def load(bin_dir: str | None = None) -> GgmlLib:
    if bin_dir is None:
        from .build import bin_dir as default_bin_dir
        bin_dir = os.environ.get("TQ_BIN_DIR") or str(default_bin_dir())
    directory = Path(bin_dir)
    base = ctypes.CDLL(str(_lib_file(directory, "ggml-base")), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(_lib_file(directory, "ggml-cpu")), mode=ctypes.RTLD_GLOBAL)
    base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    base.ggml_get_type_traits.argtypes = [ctypes.c_int]
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    cpu.tq_cpu_mad_rotated.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    cpu.tq_cpu_unrotate_row.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    cpu.tq_cpu_mad_f32_rotated.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_float]
    cpu.tq_cpu_set_simd_level.argtypes = [ctypes.c_int]
    cpu.tq_cpu_set_simd_level.restype = ctypes.c_int
    cpu.tq_cpu_simd_name.restype = ctypes.c_char_p
    return GgmlLib(base, cpu)
