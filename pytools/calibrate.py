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
# tq3c: the positions a calibration serves by default, the tokens of one decoded chunk, and at most
# how many chunks (the calibration text has about 8K tokens)
TQ3C_CTX = 4096
TQ3C_CHUNK = 1024
TQ3C_MAX_CHUNKS = 8
TQ3C_VERSION = 3         # 1: one decode of the first 1024 tokens (positions 0-1023); 2: chunks end to end
SPLIT_VERSION = 1        # the outlier split (tq2o, tq3o): channels ranked over chunks spread over TQ3C_CTX


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
    def tensors(writer) -> None:
        for il, m in sorted(means.items()):
            writer.add_tensor(f"tq_key_mean.{il}", m)

    _write_calibration(path, model, n_tokens, tensors)


def tq3c_file(model: Path, n_ctx: int = TQ3C_CTX) -> Path:
    """Where the tq3c transforms of a model for caches of up to n_ctx positions are cached."""
    return cache_dir() / "calibration" / f"{_model_sha256(model)}-tq3c-v{TQ3C_VERSION}-ctx{n_ctx}.gguf"


def tq3c_ctx_for(n_ctx: int | None) -> int:
    """The calibration a tq3c cache of n_ctx positions uses: n_ctx rounded up to llama.cpp's 256-cell
    padding (-c 4160 holds 4352 cells), at least 256; TQ3C_CTX where the context is not known."""
    if n_ctx is None or n_ctx <= 0:
        return TQ3C_CTX
    return max(256, -(-n_ctx // 256) * 256)


def tq3c_positions(n_ctx: int, n_chunks: int) -> list[int]:
    """The first positions of the calibration chunks (min(TQ3C_CHUNK, n_ctx) tokens each) for caches
    of n_ctx positions, given how many whole chunks the text has: up to TQ3C_MAX_CHUNKS, spread evenly
    over [0, n_ctx - chunk], so that every position of the cache is seen and none past it. RoPE's slow
    channel pairs turn with position: a calibration specialises to the positions it saw (SmolLM2 at a
    512-token context: KLD 0.094 calibrated over positions 0-1023, 0.119 over 0-4095)."""
    chunk = min(TQ3C_CHUNK, n_ctx)
    m = max(1, min(n_chunks, TQ3C_MAX_CHUNKS))
    if m == 1:
        return [0]
    return [round(i * (n_ctx - chunk) / (m - 1)) for i in range(m)]


def tq3c_calibration_dumps(model: Path, n_ctx: int = TQ3C_CTX) -> list[dict]:
    """kv_dump's rows of the calibration chunks for caches of n_ctx positions (tq3c_positions)."""
    from .kv_dump import dump_kv_chunks

    return dump_kv_chunks(model, calibration_text(), min(TQ3C_CHUNK, n_ctx),
                          lambda n: tq3c_positions(n_ctx, n), n_threads=2)


def _calibration_layers(model: Path, n_ctx: int, what: str, block: int):
    """The tokens of the calibration chunks for caches of n_ctx positions (tq3c_positions), and per
    layer (layer, keys [n, n_head_kv, d], queries [n, n_head, d]) float64, each chunk's first row left
    out (a chunk's first token draws attention as a sink does; the cache keeps the real sink, position
    0, exactly). The caller's code (what) needs 256 tokens and head sizes that are multiples of block."""
    dumps = tq3c_calibration_dumps(model, n_ctx)
    n_rows = sum(d["n_tokens"] for d in dumps)
    if n_rows < 256:
        raise UserError(f"the calibration text gave only {n_rows} tokens ({what} needs 256)")

    def layers():
        for il in range(len(dumps[0]["Kcur"])):
            k_all = np.concatenate([np.asarray(d["Kcur"][il], dtype=np.float64)[1:] for d in dumps])
            q_all = np.concatenate([np.asarray(d["Qcur"][il], dtype=np.float64)[1:] for d in dumps])
            if k_all.shape[2] % block != 0:
                raise UserError(f"layer {il}: head size {k_all.shape[2]} is not a multiple of {block}, which {what} blocks need")
            yield il, k_all, q_all

    return n_rows, layers()


def measure_tq3c(model: Path, n_ctx: int = TQ3C_CTX) -> tuple[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    """Per layer: the key mean [n_head_kv * d] and, per KV head, the tq3c transforms of the centred
    keys and of the queries (tq3c.key_transforms) [n_head_kv, d, d], all float32, from the rows of the
    calibration chunks spread over n_ctx positions, each chunk's first row left out (a chunk's first
    token draws attention as a sink does; the cache keeps the real sink, position 0, exactly); and
    how many rows that was."""
    from .tq3c import key_transforms

    out = {}
    n_rows, layers = _calibration_layers(model, n_ctx, "tq3c", 64)
    for il, k_all, q_all in layers:
        hkv = k_all.shape[1]
        g = q_all.shape[1] // hkv
        mean = k_all.mean(axis=0)
        wk, wq = zip(*(key_transforms(k_all[:, h] - mean[h], q_all[:, h * g:(h + 1) * g]) for h in range(hkv)))
        out[il] = (mean.reshape(-1).astype(np.float32), np.stack(wk).astype(np.float32), np.stack(wq).astype(np.float32))
        if not all(np.all(np.isfinite(a)) for a in out[il]):
            raise UserError(f"the tq3c transforms of layer {il} are not finite over the calibration text")
    return out, n_rows


def write_tq3c(path: Path, model: Path, layers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], n_tokens: int,
               n_ctx: int) -> None:
    from .tq3c import TQ3C_PROFILE

    def tensors(writer) -> None:
        writer.add_array("tq.tq3c.profile", list(TQ3C_PROFILE))
        writer.add_uint32("tq.tq3c.n_ctx", n_ctx)
        for il, (mean, wk, wq) in sorted(layers.items()):
            writer.add_tensor(f"tq3c_k_mean.{il}", mean)
            writer.add_tensor(f"tq3c_k_transform.{il}", wk)
            writer.add_tensor(f"tq3c_q_transform.{il}", wq)

    _write_calibration(path, model, n_tokens, tensors)


def split_file(model: Path) -> Path:
    """Where the outlier-split transforms of a model (tq2o, tq3o keys) are cached."""
    return cache_dir() / "calibration" / f"{_model_sha256(model)}-split-v{SPLIT_VERSION}.gguf"


def measure_split(model: Path) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Per layer: the key mean [n_head_kv * d] and per KV head the orthogonal outlier-split transform
    (tq_split.split_transform of the channels ranked by tq_split.outlier_channels) [n_head_kv, d, d],
    float32, from the same calibration chunks as tq3c's for TQ3C_CTX positions (each chunk's first row
    left out); and how many rows that was."""
    from .tq_split import QK_SPLIT, outlier_channels, split_transform

    out = {}
    n_rows, layers = _calibration_layers(model, TQ3C_CTX, "tq2o/tq3o", QK_SPLIT)
    for il, k_all, q_all in layers:
        hkv = k_all.shape[1]
        g = q_all.shape[1] // hkv
        mean = k_all.mean(axis=0)
        w = [split_transform(outlier_channels(k_all[:, h] - mean[h], q_all[:, h * g:(h + 1) * g])) for h in range(hkv)]
        out[il] = (mean.reshape(-1).astype(np.float32), np.stack(w).astype(np.float32))
        if not all(np.all(np.isfinite(a)) for a in out[il]):
            raise UserError(f"the outlier-split transforms of layer {il} are not finite over the calibration text")
    return out, n_rows


def write_split(path: Path, model: Path, layers: dict[int, tuple[np.ndarray, np.ndarray]], n_tokens: int) -> None:
    from .tq_split import N_HI

    def tensors(writer) -> None:
        writer.add_uint32("tq.split.n_hi", N_HI)
        for il, (mean, w) in sorted(layers.items()):
            writer.add_tensor(f"tq_split_k_mean.{il}", mean)
            writer.add_tensor(f"tq_split_k_transform.{il}", w)
            writer.add_tensor(f"tq_split_q_transform.{il}", w)    # orthogonal: (q W) . (k W) = q . k

    _write_calibration(path, model, n_tokens, tensors)


def _write_calibration(path: Path, model: Path, n_tokens: int, add) -> None:
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
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


def key_means(model: str | Path, n_tokens: int = DEFAULT_TOKENS, force: bool = False, quiet: bool = False) -> Path:
    """The key-means GGUF of a model (a short name or a path), calibrated on first use."""
    return _calibrated(model, "key-means", n_tokens, force, quiet)


def tq3c_transforms(model: str | Path, n_ctx: int = TQ3C_CTX, force: bool = False, quiet: bool = False) -> Path:
    """The tq3c-transforms GGUF of a model (a short name or a path) for caches of up to n_ctx
    positions, calibrated on first use."""
    return _calibrated(model, "tq3c", n_ctx, force, quiet)


def split_transforms(model: str | Path, force: bool = False, quiet: bool = False) -> Path:
    """The outlier-split transforms GGUF of a model (a short name or a path) for tq2o and tq3o keys,
    calibrated on first use."""
    return _calibrated(model, "split", TQ3C_CTX, force, quiet)


def _calibrated(model: str | Path, kind: str, n: int, force: bool, quiet: bool) -> Path:
    """n: tokens (key means) or the positions the cache serves (tq3c; the split's chunks)."""
    from .models import model_path

    gguf = model_path(str(model))
    path = {"key-means": lambda: key_means_file(gguf, n), "tq3c": lambda: tq3c_file(gguf, n),
            "split": lambda: split_file(gguf)}[kind]()
    if path.exists() and not force:
        return path
    what = {"key-means": "mean keys", "tq3c": "tq3c key transforms", "split": "outlier-split key transforms"}[kind]
    over = {"key-means": f"{n} tokens of", "tq3c": f"caches of up to {n} positions, with chunks of",
            "split": f"chunks over {n} positions of"}[kind]
    if not quiet:
        print(f"tq: calibrating the {what} of {gguf.name} for {over} {CALIBRATION_TEXT.name} "
              f"(once; cached in {path.parent}) ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    # in a child process: llama.cpp aborts the process on a model it cannot run, and a calibration
    # must fail with a message, not take the caller (a server, a test run) down with it
    proc = subprocess.run([sys.executable, "-m", "turboquant_llama.calibrate", str(gguf), str(n), str(path), kind],
                          capture_output=True, text=True, errors="replace")
    if proc.returncode != 0 or not path.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        hint = ("turn key centering off (--tq-key-center off, tq_key_center=False) to run without them"
                if kind == "key-means" else "use tq3 keys instead")
        raise UserError(f"calibrating the {what} of {gguf.name} failed (exit {proc.returncode}); {hint}:\n{tail}")
    return path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure a model's mean keys for TQ key centering (cached; printed path)")
    p.add_argument("--model", required=True, help="model name from `tq models list` or a GGUF path")
    p.add_argument("--tokens", type=int, default=None, help=f"mean keys: calibration tokens (default {DEFAULT_TOKENS})")
    p.add_argument("--force", action="store_true", help="measure again even if a cached file exists")
    p.add_argument("--tq3c", action="store_true", help="the tq3c key transforms instead of the mean keys")
    p.add_argument("--split", action="store_true",
                   help="the outlier-split key transforms (tq2o and tq3o keys) instead of the mean keys")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"--tq3c: the longest cache (positions) the transforms serve (default {TQ3C_CTX}); "
                        "llama.cpp refuses longer tq3c caches with them")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.split:
        if args.tq3c or args.tokens is not None or args.ctx is not None:
            raise UserError("--split takes no --tq3c, --tokens or --ctx (its transforms serve caches of any length)")
        print(split_transforms(args.model, force=args.force))
        return 0
    flag, wrong = ("--ctx", args.tokens) if args.tq3c else ("--tokens", args.ctx)
    if wrong is not None:
        raise UserError("--tokens is for the mean keys, --ctx for --tq3c (the positions its caches hold)")
    given = args.ctx if args.tq3c else args.tokens
    n, least, calibrated = (TQ3C_CTX, 256, tq3c_transforms) if args.tq3c else (DEFAULT_TOKENS, 64, key_means)
    n = n if given is None else given
    if n < least:
        raise UserError(f"{flag} must be at least {least}")
    print(calibrated(args.model, n, force=args.force))
    return 0


if __name__ == "__main__":   # the child of _calibrated: GGUF, token count, output file, kind
    model_arg, tokens_arg, out_arg, kind_arg = sys.argv[1:5]
    model_file, n = Path(model_arg), int(tokens_arg)
    if kind_arg == "tq3c":
        tq3c_layers, n_rows = measure_tq3c(model_file, n)
        write_tq3c(Path(out_arg), model_file, tq3c_layers, n_rows, n)
    elif kind_arg == "split":
        split_layers, n_rows = measure_split(model_file)
        write_split(Path(out_arg), model_file, split_layers, n_rows)
    else:
        write_key_means(Path(out_arg), model_file, measure_key_means(model_file, n), n)
