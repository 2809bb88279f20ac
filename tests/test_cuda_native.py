"""The CUDA kernels of ggml_tq (tq-cuda.cu, tq-cuda.cuh, tq-cuda.h), without llama.cpp.

Where nvcc is on PATH the kernels are compiled for sm_90 (every attention instance: a few minutes on
2 cores) together with tests/native/tq_cuda_check.cu, the check that holds them against the C
reference (ggml_tq/tq.c) and the CPU attention path (ggml_tq/tq-cpu.c): CI has nvcc and no GPU, so a
kernel that does not compile cannot land. Where a GPU is present the check also runs (--quick: every
quantize/dequantize byte and value of 16384 rows, a quarter of the attention cases). Without nvcc the
compile cases skip, unless TQ_REQUIRE_NVCC=1, where they fail. The full check and the timings run on
the GPU machine through tests/native/tq_cuda_run.sh (results/cuda-kernels.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests" / "native"
TIMEOUT_S = 1800
SM = os.environ.get("TQ_CUDA_SM", "90")


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("TQ_REQUIRE_NVCC") == "1":
            pytest.fail("TQ_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc is not on PATH (TQ_REQUIRE_NVCC=1 makes this a failure)")
    return nvcc


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0 and "GPU" in proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _nvcc()
    out = tmp_path_factory.mktemp("tq_cuda")
    proc = subprocess.run(["sh", str(NATIVE / "tq_cuda_build.sh"), str(out), SM], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        ptxas = (out / "ptxas.txt").read_text() if (out / "ptxas.txt").exists() else ""
        pytest.fail(f"tq_cuda_build.sh failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{ptxas[-4000:]}")
    return out


def test_c_api_header_is_plain_c(tmp_path: Path) -> None:
    """tq-cuda.h is what ggml-cuda's C++ and any C caller include: it must stand alone as C11."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "api.c"
    src.write_text('#include "tq-cuda.h"\nint main(void) { return tq_cuda_fattn_supported(44, 43, 128, 128) ? 0 : 1; }\n')
    proc = subprocess.run([cc, "-std=c11", "-Wall", "-Werror", f"-I{ROOT / 'ggml_tq'}", "-fsyntax-only", str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_kernels_compile_without_local_memory_arrays(built: Path) -> None:
    """Every kernel compiled; none keeps a per-thread array in local memory (a run-time index into
    a register array shows as a stack frame of hundreds of bytes, and costs its speed)."""
    ptxas = (built / "ptxas.txt").read_text()
    entries = re.findall(r"Compiling entry function '(\w+)'", ptxas)
    assert sum("tq_fattn_vec_kernel" in e for e in entries) >= 3 * 22 * 4, "attention instances missing"
    assert sum("tq_fattn_mma_kernel" in e for e in entries) == 2 * 9, "tensor-core attention instances missing"
    assert any("tq_set_rows_kernel" in e for e in entries) and any("tq_get_rows_kernel" in e for e in entries)
    assert sum("tq_set_rows_pair_kernel" in e for e in entries) == 3 * 3 * 2 * 2, "K/V pair quantizer instances missing"
    frames = [int(x) for x in re.findall(r"(\d+) bytes stack frame", ptxas)]
    assert frames and max(frames) <= 128, f"a kernel has a {max(frames)}-byte stack frame"


def test_check_runs_on_gpu(built: Path) -> None:
    if not _has_gpu():
        pytest.skip("no GPU here: the check was compiled, not run (tests/native/tq_cuda_run.sh runs it on one)")
    proc = subprocess.run([str(built / "tq_cuda_check"), "--quick"], capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    m = re.search(r"^(\d+) passed, (\d+) failed$", out, re.M)
    assert m, out[-4000:]
    assert int(m.group(2)) == 0 and proc.returncode == 0, out[-4000:]
    assert int(m.group(1)) > 300, out[-4000:]


def test_check_times_one_length_for_a_profiler(built: Path) -> None:
    """`--time-only --cells N` times one cache length without the checks (what ncu is pointed at); a length the
    timings do not have is refused before any GPU work, with the lengths it takes."""
    check = str(built / "tq_cuda_check")
    proc = subprocess.run([check, "--time-only", "--cells", "5000"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "256, 1024, 4096, 32768, 65536" in proc.stderr, proc.stderr
    proc = subprocess.run([check, "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--time-only" in proc.stderr, proc.stderr
    if _has_gpu():
        proc = subprocess.run([check, "--time-only", "--cells", "256"], capture_output=True, text=True, timeout=TIMEOUT_S)
        out = proc.stdout
        assert proc.returncode == 0 and "| tq3/tq2 mma |" in out and "| 4096 |" not in out, out[-4000:]
        assert "attention:" not in out, "the checks ran"


def test_cuda_build_targets_the_gpus_users_have() -> None:
    """`tq build --cuda` asks for each user architecture this nvcc lists, and only those."""
    from turboquant_llama.build import cuda_architectures

    listed = "compute_75\ncompute_80\ncompute_86\ncompute_89\ncompute_90\ncompute_100\ncompute_120\n"
    assert cuda_architectures(listed) == "86;89;90;120"
    assert cuda_architectures("compute_75\ncompute_86\ncompute_90\n") == "86;90"
    assert cuda_architectures("") == "90"


def test_ggml_cuda_routing_kernels_compile_for_every_user_arch(tmp_path: Path) -> None:
    """The kernels the ggml-cuda routing uses, one instance of each, compile for sm_86, sm_89, sm_90
    and sm_120 (tq-cuda.cu's full build is for sm_90 above; this keeps the other archs honest)."""
    nvcc = _nvcc()
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    src = tmp_path / "inst.cu"
    src.write_text('#include "tq-cuda.cuh"\n'
                   "template __global__ void tq_fattn_vec_kernel<128, TQK_TQ3, TQK_TQ2, 4>(const tq_fattn_params, const __grid_constant__ tq_cuda_tables);\n"
                   "template __global__ void tq_fattn_mma_kernel<128, TQK_TQ3, TQK_TQ2>(const tq_fattn_params, const __grid_constant__ tq_cuda_tables);\n"
                   "template __global__ void tq_fattn_mma_kernel<64, TQK_TQ4, TQK_TQ4>(const tq_fattn_params, const __grid_constant__ tq_cuda_tables);\n"
                   "template __global__ void tq_fattn_combine_kernel<128, true>(const tq_fattn_params, const __grid_constant__ tq_cuda_tables);\n"
                   "template __global__ void tq_set_rows_kernel<3, float, int64_t>(const tq_rows_params, const __grid_constant__ tq_cuda_tables);\n"
                   "template __global__ void tq_get_rows_kernel<2, __half, int32_t>(const tq_rows_params, const __grid_constant__ tq_cuda_tables);\n")
    for arch in ("86", "89", "90", "120"):
        if f"compute_{arch}" not in listed:
            continue
        out = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-use_fast_math", f"-I{ROOT / 'ggml_tq'}",
                              f"-I{NATIVE / 'include'}", "-c", str(src), "-o", str(tmp_path / f"inst{arch}.o")],
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        assert out.returncode == 0, f"sm_{arch}:\n{out.stderr[-3000:]}"


def test_ggml_cuda_routing_compiles_against_ggml_cuda(tmp_path: Path) -> None:
    """ggml_tq/tq-ggml-cuda.cu (the ops ggml-cuda routes to the TQ kernels) compiles against the
    patched tree's ggml-cuda headers, as the CUDA build compiles it; cuBLAS, which CI's toolkit
    lacks, is declared by tests/native/include-cublas-stub."""
    from turboquant_llama.upstream import prepare_tree

    from .conftest import require_build

    nvcc = _nvcc()
    require_build()
    tree = prepare_tree()
    out = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{SM}", "-use_fast_math", "-DGGML_CUDA_USE_GRAPHS",
                          f"-I{NATIVE / 'include-cublas-stub'}", f"-I{ROOT / 'ggml_tq'}",
                          f"-I{tree / 'ggml/src/ggml-cuda'}", f"-I{tree / 'ggml/src'}", f"-I{tree / 'ggml/include'}",
                          "-c", str(ROOT / "ggml_tq" / "tq-ggml-cuda.cu"), "-o", str(tmp_path / "glue.o")],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-4000:]
