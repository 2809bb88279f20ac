"""Each SIMD level of the CPU kernels (ggml_tq/tq-cpu.c) against the scalar reference (ggml_tq/tq.c,
which is also the CPU's scalar level), and the TQ attention rows, without llama.cpp.

tests/native/tq_simd_check.c is built with ggml_tq/tq.c, ggml_tq/tq-cpu.c and a stand-in for the few
ggml symbols they use (tests/native/ggml_stub.c, tests/native/include/), then run:
  - natively with the host C compiler: on x86-64 the reference against AVX2 (and AVX-512 where the
    processor has it);
  - cross-compiled for aarch64 (-static) and run under qemu-aarch64: the reference against NEON. That needs
    `aarch64-linux-gnu-gcc` and `qemu-aarch64` on PATH (Debian: apt-get install gcc-aarch64-linux-gnu
    qemu-user); without them the case skips, unless TQ_REQUIRE_CROSS=1, where it fails.
Both runs also print a checksum of what the scalar reference (tq.c) produced from the same data; the
two architectures must agree bit for bit.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests" / "native"
INCLUDES = [f"-I{NATIVE / 'include'}", f"-I{ROOT / 'ggml_tq'}"]
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
TIMEOUT_S = 600


@dataclass
class CheckRun:
    output: str
    returncode: int

    @property
    def counts(self) -> tuple[int, int]:
        m = re.search(r"^(\d+) passed, (\d+) failed$", self.output, re.M)
        assert m, f"no closing 'N passed, M failed' line:\n{self.output}"
        return int(m.group(1)), int(m.group(2))

    @property
    def levels(self) -> list[str]:
        m = re.search(r"^simd levels:(.*)$", self.output, re.M)
        assert m, self.output
        return [item.split("=", 1)[1] for item in m.group(1).split()]

    @property
    def checksum(self) -> str:
        m = re.search(r"^reference checksum: ([0-9a-f]+)$", self.output, re.M)
        assert m, self.output
        return m.group(1)


def _sh(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _build(cc: str, out_dir: Path, flags: list[str], link_flags: list[str] = ()) -> Path:
    """The real build's flags for the two library sources: -ffp-contract=off for the reference
    (tq.c), plain -O2 for the kernels (their SIMD paths carry target attributes)."""
    tq_o, cpu_o, exe = out_dir / "tq.o", out_dir / "tq-cpu.o", out_dir / "tq_simd_check"
    _sh([cc, "-O2", "-ffp-contract=off", *flags, *INCLUDES, "-c", str(ROOT / "ggml_tq" / "tq.c"), "-o", str(tq_o)])
    _sh([cc, "-O2", *flags, *INCLUDES, "-c", str(ROOT / "ggml_tq" / "tq-cpu.c"), "-o", str(cpu_o)])
    _sh([cc, "-O2", "-ffp-contract=off", *flags, *INCLUDES, str(NATIVE / "tq_simd_check.c"), str(NATIVE / "ggml_stub.c"),
         str(tq_o), str(cpu_o), *link_flags, "-lm", "-o", str(exe)])
    return exe


def _run(cmd: list[str]) -> CheckRun:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return CheckRun(proc.stdout + proc.stderr, proc.returncode)


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _native_expectations() -> list[str]:
    """The SIMD levels this machine must offer, from what the processor says it has."""
    machine = platform.machine().lower()
    flags = _host_flags()
    expect = []
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma"} <= flags:
            expect.append("avx2")
            if "avx512f" in flags:
                expect.append("avx512")
    elif machine in ("aarch64", "arm64"):
        expect.append("neon")
    return expect


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> CheckRun:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) on PATH")
    flags = ["-march=x86-64-v2"] if platform.machine().lower() in ("x86_64", "amd64") else []
    exe = _build(cc, tmp_path_factory.mktemp("native"), flags)
    cmd = [str(exe)]
    for name in _native_expectations():
        cmd += ["--expect", name]
    return _run(cmd)


@pytest.fixture(scope="module")
def aarch64_run(tmp_path_factory) -> CheckRun:
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        message = (f"{' and '.join(missing)} not on PATH: the NEON path is not checked "
                   "(Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)")
        if os.environ.get("TQ_REQUIRE_CROSS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    exe = _build(CROSS_CC, tmp_path_factory.mktemp("aarch64"), ["-march=armv8-a"], ["-static"])
    return _run([QEMU, str(exe), "--expect", "neon"])


def test_native_simd_levels_match_scalar(native_run):
    passed, failed = native_run.counts
    assert failed == 0 and native_run.returncode == 0, native_run.output
    assert passed > 0
    assert native_run.levels[0] == "scalar"


def test_aarch64_neon_matches_scalar_under_qemu(aarch64_run):
    passed, failed = aarch64_run.counts
    assert failed == 0 and aarch64_run.returncode == 0, aarch64_run.output
    assert aarch64_run.levels == ["scalar", "neon"]
    assert passed > 0


def test_reference_bits_equal_across_architectures(native_run, aarch64_run):
    """tq.c (built with -ffp-contract=off) quantizes, decodes and rotates to the same bits on the
    host and on aarch64."""
    assert native_run.checksum == aarch64_run.checksum
