"""`tq build`: configure and build the patched llama.cpp with ggml_tq/ (CPU, or CUDA on the GPU
machine). The build folder lives in the cache, outside the clone, so rebuilds are incremental and
ccache (used by ggml when installed) makes fresh build folders cheap.

Standard library only (runs on the GPU machine too).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from . import REPO_ROOT
from .errors import UserError
from .upstream import cache_dir, prepare_tree

# What llama.cpp users run, the shared libraries llama-cpp-python loads, and the op tests.
DEFAULT_TARGETS = ("llama", "llama-cli", "llama-completion", "llama-perplexity", "llama-bench", "llama-server",
                   "ggml-rpc-server", "test-backend-ops")
CUDA_TARGETS = ("llama", "llama-completion", "llama-perplexity", "llama-bench", "llama-server", "ggml-rpc-server",
                "test-backend-ops")


def build_dir(cuda: bool = False) -> Path:
    env = os.environ.get("TQ_BUILD_DIR")
    if env:
        return Path(env)
    return cache_dir() / ("build-cuda" if cuda else "build-cpu")


def bin_dir(cuda: bool = False) -> Path:
    return build_dir(cuda) / "bin"


def find_binary(name: str, cuda: bool = False) -> Path:
    """A built llama.cpp program; a clear error if it has not been built."""
    path = bin_dir(cuda) / name
    if not path.exists():
        raise UserError(f"{path} does not exist: run `tq build{' --cuda' if cuda else ''}` first")
    return path


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"{tool} not found: {hint}")
    return path


def stage_sources() -> Path:
    """Copy the top-level CMakeLists.txt and ggml_tq/ to a fixed folder in the cache, rewriting only
    files that changed: the build folder then always sees the same source path, so a fresh clone
    elsewhere (CI) rebuilds incrementally instead of failing on CMake's source-path check."""
    dest = cache_dir() / "tq-src"
    wanted = {Path("CMakeLists.txt")} | {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "ggml_tq").rglob("*") if p.is_file()}
    for rel in wanted:
        src, dst = REPO_ROOT / rel, dest / rel
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        # the copy's time is now, not the source's: a source edited while an earlier build compiled
        # its staged copy would otherwise look older than that object, and ninja would keep it
        shutil.copy(src, dst)
    for p in list(dest.rglob("*")):
        if p.is_file() and p.relative_to(dest) not in wanted:
            p.unlink()
    return dest


# ggml's option for each x86 instruction set, and its name in /proc/cpuinfo
_X86_ISA = {"GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
            "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
            "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}


def cpu_isa_args(cpuinfo: str | None = None) -> list[str]:
    """CMake arguments for the CPU backend's instruction sets. On a processor with AMX, ggml's native
    build turns on its AMX matrix kernels, which stop with SIGILL (tilezero with no tile
    configuration) on Q4_1 weights on the Xeon machines here: such a processor gets every native
    instruction set but AMX, set one by one (TQ_GGML_NATIVE=1 keeps the plain native build)."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("TQ_GGML_NATIVE") == "1":
        return []
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set(cpuinfo.split())
    if "amx_int8" not in flags and "amx_tile" not in flags:
        return []
    return ["-DGGML_NATIVE=OFF"] + [f"-D{opt}={'ON' if name in flags else 'OFF'}" for opt, name in _X86_ISA.items()]


# The GPUs users run: RTX 30xx (86), RTX 40xx (89), H100/H200 (90), RTX 50xx (120, CUDA 12.8+)
USER_CUDA_ARCHS = ("86", "89", "90", "120")


def cuda_architectures(listed: str | None = None) -> str:
    """CMAKE_CUDA_ARCHITECTURES for `tq build --cuda`: each of USER_CUDA_ARCHS that this nvcc can
    build (`nvcc --list-gpu-arch`). TQ_CUDA_ARCH=90 builds one, which is what iterating wants."""
    if listed is None:
        try:
            listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
    have = {line.strip().removeprefix("compute_") for line in listed.splitlines()}
    archs = [a for a in USER_CUDA_ARCHS if a in have]
    return ";".join(archs) if archs else "90"


def configure(tree: Path, build: Path, cuda: bool, extra: list[str]) -> None:
    _require("cmake", "install CMake 3.14 or newer (e.g. `pip install cmake` or your package manager)")
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        raise UserError("no C/C++ compiler found: install gcc and g++ (or clang)")
    if cuda:
        _require("nvcc", "the CUDA build needs the CUDA toolkit (nvcc) on PATH")
    # GGML_RPC: rpc-server, and the RPC backend in the library (`--rpc` of tq run/chat/serve and
    # load_llama(rpc_servers=)), so a model's layers can be split over machines with TQ caches
    args = ["cmake", "-S", str(stage_sources()), "-B", str(build), f"-DTQ_UPSTREAM_DIR={tree}", "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_RPC=ON"]
    if shutil.which("ninja"):
        cache = build / "CMakeCache.txt"
        if not cache.exists() or "CMAKE_GENERATOR:INTERNAL=Ninja" in cache.read_text():
            args += ["-G", "Ninja"]
    if cuda:
        args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=" + (os.environ.get("TQ_CUDA_ARCH") or cuda_architectures())]
    isa = cpu_isa_args()
    if isa:
        print("tq: this processor has AMX, whose ggml kernels crash here: building the CPU backend for its other "
              "instruction sets (TQ_GGML_NATIVE=1 builds natively)", file=sys.stderr)
    args += isa + extra
    print("tq: " + " ".join(args), file=sys.stderr)
    if subprocess.run(args).returncode != 0:
        raise UserError(f"cmake configure failed (see above); build folder {build}")


def build(targets: list[str], cuda: bool = False, jobs: int | None = None, upstream_tarball: Path | None = None,
          cmake_args: list[str] | None = None) -> Path:
    tree = prepare_tree(upstream_tarball)
    out = build_dir(cuda)
    out.mkdir(parents=True, exist_ok=True)
    # configure again when our CMakeLists changes or the tree moves; cmake itself notices the rest
    configure(tree, out, cuda, cmake_args or [])
    cmd = ["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2), "--target", *targets]
    print("tq: " + " ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise UserError("the build failed (see the compiler output above)")
    return out / "bin"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="fetch the pinned llama.cpp, apply patches/ and build it with ggml_tq/")
    p.add_argument("--cuda", action="store_true", help="CUDA build for sm_86, sm_89, sm_90 and sm_120 where nvcc has them (TQ_CUDA_ARCH=90: one, for iterating)")
    p.add_argument("--targets", default=None,
                   help="comma-separated cmake targets (default: " + ",".join(DEFAULT_TARGETS) + ")")
    p.add_argument("--jobs", "-j", type=int, default=None)
    p.add_argument("--upstream-tarball", type=Path, default=None, help="a tarball from `tq pack-upstream` instead of the sdist")
    p.add_argument("--cmake-arg", action="append", default=[], help="extra cmake configure argument (repeatable)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("bin-dir", help="print the folder of the built llama.cpp programs and libraries")
    p.add_argument("--cuda", action="store_true")
    p.set_defaults(func=lambda a: print(bin_dir(a.cuda)) or 0)


def _cmd_build(args: argparse.Namespace) -> int:
    targets = args.targets.split(",") if args.targets else list(CUDA_TARGETS if args.cuda else DEFAULT_TARGETS)
    out = build(targets, cuda=args.cuda, jobs=args.jobs, upstream_tarball=args.upstream_tarball, cmake_args=args.cmake_arg)
    print(out)
    return 0
