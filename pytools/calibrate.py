"""`tq calibrate`: a model's mean keys for TQ key centering, measured once over a calibration text
that ships with the project and cached by the GGUF's sha256.

A TQ cache stores k - m with m a per-layer constant of the model (llama.cpp's `--tq-key-means`,
llama-cpp-python's `tq_key_means`): softmax ignores a vector subtracted from every key, the
quantizer does not, and most of a key's length is the part all keys share. A constant m keeps a
sequence's results independent of what the cache saw before and of how its prompt was batched,
which means taken from live traffic cannot.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import REPO_ROOT
from .errors import UserError
from .upstream import cache_dir, sha256_file

CALIBRATION_TEXT = REPO_ROOT / "pytools" / "data" / "calibration-gpl-3.0.txt"
# bump when the measurement changes, so that cached files of the old rule are not reused
CALIBRATION_VERSION = 1
DEFAULT_TOKENS = 512


def calibration_text() -> str:
    return CALIBRATION_TEXT.read_text(encoding="utf-8")


def _model_sha256(model: Path) -> str:
    """The GGUF's sha256, remembered next to the calibration files by (path, size, mtime)."""
    st = model.stat()
    memo = cache_dir() / "calibration" / "sha256" / hashlib.sha256(
        f"{model.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(model)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest + "\n")
    return digest


def key_means_file(model: Path, n_tokens: int = DEFAULT_TOKENS) -> Path:
    """Where the key means of this GGUF are cached (the file may not exist yet)."""
    return cache_dir() / "calibration" / f"{_model_sha256(model)}-key-means-v{CALIBRATION_VERSION}-{n_tokens}.gguf"


def measure_key_means(model: Path, n_tokens: int = DEFAULT_TOKENS) -> dict[int, np.ndarray]:
    """Per layer, the mean over positions 1..n-1 of the calibration text of the keys the model
    writes to its cache (after RoPE), as float32 [n_head_kv * head_dim]. Position 0 is left out:
    its key is the attention sink's, far from the others, and the exact sink stores it anyway."""
    from .kv_dump import dump_kv

    dump = dump_kv(model, calibration_text(), n_tokens=n_tokens, n_threads=2)
    if dump["n_tokens"] < 64:
        raise UserError(f"the calibration text gave only {dump['n_tokens']} tokens")
    means = {}
    for il, k in enumerate(dump["Kcur"]):
        rows = np.asarray(k, dtype=np.float64).reshape(k.shape[0], -1)[1:]
        means[il] = rows.mean(axis=0).astype(np.float32)
        if not np.all(np.isfinite(means[il])):
            raise UserError(f"the keys of layer {il} are not finite over the calibration text")
    return means


def write_key_means(path: Path, model: Path, means: dict[int, np.ndarray], n_tokens: int) -> None:
    from gguf import GGUFReader, GGUFWriter

    arch_field = GGUFReader(model).get_field("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    tmp = path.with_suffix(".tmp")
    writer = GGUFWriter(tmp, arch)
    writer.add_string("tq.calibration.text", CALIBRATION_TEXT.name)
    writer.add_string("tq.calibration.text_sha256", hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest())
    writer.add_uint32("tq.calibration.n_tokens", n_tokens)
    writer.add_uint32("tq.calibration.version", CALIBRATION_VERSION)
    writer.add_string("tq.model.sha256", _model_sha256(model))
    for il, m in sorted(means.items()):
        writer.add_tensor(f"tq_key_mean.{il}", m)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


def key_means(model: str | Path, n_tokens: int = DEFAULT_TOKENS, force: bool = False, quiet: bool = False) -> Path:
    """The key-means GGUF of a model (a short name or a path), calibrated on first use."""
    from .models import model_path

    gguf = model_path(str(model))
    path = key_means_file(gguf, n_tokens)
    if path.exists() and not force:
        return path
    if not quiet:
        print(f"tq: calibrating the mean keys of {gguf.name} over {n_tokens} tokens of {CALIBRATION_TEXT.name} "
              f"(once; cached in {path.parent}) ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    # in a child process: llama.cpp aborts the process on a model it cannot run, and a calibration
    # must fail with a message, not take the caller (a server, a test run) down with it
    proc = subprocess.run([sys.executable, "-m", "turboquant_llama.calibrate", str(gguf), str(n_tokens), str(path)],
                          capture_output=True, text=True, errors="replace")
    if proc.returncode != 0 or not path.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        raise UserError(f"calibrating the key means of {gguf.name} failed (exit {proc.returncode}); turn key centering "
                        f"off (--tq-key-center off, tq_key_center=False) to run without them:\n{tail}")
    return path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure a model's mean keys for TQ key centering (cached; printed path)")
    p.add_argument("--model", required=True, help="model name from `tq models list` or a GGUF path")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"calibration tokens (default {DEFAULT_TOKENS})")
    p.add_argument("--force", action="store_true", help="measure again even if a cached file exists")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.tokens < 64:
        raise UserError("--tokens must be at least 64")
    print(key_means(args.model, args.tokens, force=args.force))
    return 0


if __name__ == "__main__":   # the child of key_means: GGUF, token count, output file
    model_arg, tokens_arg, out_arg = sys.argv[1:4]
    write_key_means(Path(out_arg), Path(model_arg), measure_key_means(Path(model_arg), int(tokens_arg)), int(tokens_arg))
