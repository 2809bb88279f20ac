"""The pinned upstream: llama.cpp as vendored in the llama-cpp-python sdist, fetched by version and
sha256, patched by patches/ into a tree outside the repository.

Standard library only: this module also runs on the GPU machine, which has no network and few
packages.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import REPO_ROOT
from .errors import UserError


@dataclass(frozen=True)
class PinnedUpstream:
    package: str
    version: str
    sdist_name: str
    sdist_sha256: str
    sdist_bytes: int
    llama_cpp_commit: str
    vendor_prefix: str


UPSTREAM = PinnedUpstream(
    package="llama-cpp-python",
    version="0.3.36",
    sdist_name="llama_cpp_python-0.3.36.tar.gz",
    sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    sdist_bytes=76_589_250,
    llama_cpp_commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    vendor_prefix="llama_cpp_python-0.3.36/vendor/llama.cpp/",
)

COMPACT_NAME = f"llama.cpp-{UPSTREAM.llama_cpp_commit[:12]}-compact.tar.xz"
PATCHES_DIR = REPO_ROOT / "patches"
# patches to the sdist's Python package (llama_cpp/), applied by `tq install-python`
PYTHON_PATCHES_DIR = PATCHES_DIR / "llama-cpp-python"

# What the compact tarball leaves out: documentation, assets, the web UI sources and the vocab
# GGUFs (tests that need them are not built). tools/ui keeps the four files its CMake needs.
_COMPACT_DROP_DIRS = ("docs/", "media/", "examples/", "pocs/", "benches/", ".devops/", ".github/", "ci/", "app/",
                      "skills/", "models/", "tools/ui/", "gguf-py/tests/")
_COMPACT_KEEP = ("tools/ui/CMakeLists.txt", "tools/ui/sources.cmake", "tools/ui/ui.cpp.in", "tools/ui/ui.h.in",
                 "examples/CMakeLists.txt")
_COMPACT_KEEP_DIRS = ("examples/gguf-hash/deps/",)


def cache_dir() -> Path:
    """Where downloads, the patched tree and build folders live (never inside the git tree)."""
    root = os.environ.get("TQ_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "turboquant-llama"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist, downloaded with pip on first use and checked against its sha256."""
    target_dir = cache_dir() / "sdist"
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / UPSTREAM.sdist_name
    if not path.exists():
        print(f"tq: downloading {UPSTREAM.package}=={UPSTREAM.version} (sdist, {UPSTREAM.sdist_bytes / 1e6:.0f} MB) with pip ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{UPSTREAM.package}=={UPSTREAM.version}", "-d", str(target_dir)]
        result = subprocess.run(cmd)
        if result.returncode != 0 or not path.exists():
            raise UserError(f"could not download {UPSTREAM.package}=={UPSTREAM.version} with pip "
                            f"(exit {result.returncode}); check the network or put {UPSTREAM.sdist_name} in {target_dir}")
    digest = sha256_file(path)
    if digest != UPSTREAM.sdist_sha256:
        raise UserError(f"{path} has sha256 {digest}, expected {UPSTREAM.sdist_sha256} "
                        f"({UPSTREAM.package}=={UPSTREAM.version}); delete it and run again")
    return path


def _compact_member(rel: str) -> bool:
    if rel in _COMPACT_KEEP or any(rel.startswith(d) for d in _COMPACT_KEEP_DIRS):
        return True
    if rel.startswith(_COMPACT_DROP_DIRS):
        return False
    return not rel.endswith((".gguf", ".png", ".jpg", ".gif", ".mp4", ".webp"))


def pack_upstream(output: Path) -> Path:
    """Write the compact upstream tarball (the vendored tree without docs, assets and UI) to carry
    to a machine without network access."""
    sdist = fetch_sdist()
    output.parent.mkdir(parents=True, exist_ok=True)
    manifest = io.StringIO()
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(output, "w:xz", preset=6) as dst:
        for member in src:
            if not member.name.startswith(UPSTREAM.vendor_prefix) or not member.isfile():
                continue
            rel = member.name[len(UPSTREAM.vendor_prefix):]
            if rel == ".git" or not _compact_member(rel):
                continue
            data = src.extractfile(member)
            info = tarfile.TarInfo("llama.cpp/" + rel)
            info.size, info.mode, info.mtime = member.size, member.mode, member.mtime
            dst.addfile(info, data)
            manifest.write(rel + "\n")
        stamp = (f"{UPSTREAM.sdist_name} {UPSTREAM.sdist_sha256}\n").encode()
        info = tarfile.TarInfo("llama.cpp/.tq-upstream")
        info.size = len(stamp)
        dst.addfile(info, io.BytesIO(stamp))
    return output


def _extract(source: Path, source_digest: str, dest: Path) -> None:
    """Extract the llama.cpp tree from the sdist or from a compact tarball into dest."""
    with tarfile.open(source) as tar:
        if source_digest == UPSTREAM.sdist_sha256:
            prefix = UPSTREAM.vendor_prefix
        else:
            prefix = "llama.cpp/"
            try:
                stamp = tar.extractfile("llama.cpp/.tq-upstream").read().decode().split()
            except KeyError:
                raise UserError(f"{source} is neither the pinned sdist nor a tarball made by `tq pack-upstream`") from None
            if stamp != [UPSTREAM.sdist_name, UPSTREAM.sdist_sha256]:
                raise UserError(f"{source} was packed from {stamp[0]}, not the pinned {UPSTREAM.sdist_name}")
        for member in tar:
            if not member.name.startswith(prefix) or not member.isfile():
                continue
            rel = member.name[len(prefix):]
            if rel in (".git", ".tq-upstream"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out)
            os.chmod(target, member.mode | 0o600)


def patch_files() -> list[Path]:
    patches = sorted(PATCHES_DIR.glob("*.patch"))
    if not patches:
        raise UserError(f"no patches found in {PATCHES_DIR}")
    return patches


def _patch_set_digest(source_digest: str) -> str:
    digest = hashlib.sha256(source_digest.encode())
    for p in patch_files():
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


def apply_patches(tree: Path) -> None:
    """Apply patches/ in order; stop with the name of the first patch that does not apply."""
    for p in patch_files():
        check = subprocess.run(["git", "apply", "--check", "-p1", str(p)], cwd=tree, capture_output=True, text=True,
                               errors="replace")
        if check.returncode != 0:
            raise UserError(f"patch {p.name} does not apply to llama.cpp {UPSTREAM.llama_cpp_commit[:12]} "
                            f"(llama-cpp-python=={UPSTREAM.version}):\n{check.stderr.strip()}\n"
                            "The upstream tree is not the pinned one, or the patch was edited against another tree.")
        subprocess.run(["git", "apply", "-p1", str(p)], cwd=tree, check=True)


def _sync_tree(new: Path, dest: Path) -> int:
    """Make dest equal to new, rewriting only files whose bytes changed, so that an incremental
    build recompiles only what a patch changed. Returns the number of files written."""
    written = 0
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    for rel in new_files:
        src, dst = new / rel, dest / rel
        if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        written += 1
    for p in list(dest.rglob("*")):
        if p.is_file() and p.relative_to(dest) not in new_files and p.name != ".tq-patched":
            p.unlink()
    return written


def prepare_tree(source: Path | None = None, dest: Path | None = None) -> Path:
    """The patched llama.cpp tree (created or brought up to date). source: the sdist (default,
    fetched and checked) or a compact tarball from `tq pack-upstream`."""
    if shutil.which("git") is None:
        raise UserError("git is needed to apply patches/ (git apply); install git")
    if source is None:
        source = fetch_sdist()
        source_digest = UPSTREAM.sdist_sha256
    else:
        source_digest = sha256_file(source)
    dest = dest or cache_dir() / "llama.cpp"
    stamp_path = dest / ".tq-patched"
    want = _patch_set_digest(source_digest)
    if stamp_path.exists() and stamp_path.read_text().strip() == want:
        return dest
    print(f"tq: preparing the patched llama.cpp tree in {dest} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tq-upstream-", dir=cache_dir()) as tmp:
        fresh = Path(tmp) / "llama.cpp"
        fresh.mkdir()
        _extract(source, source_digest, fresh)
        apply_patches(fresh)
        dest.mkdir(parents=True, exist_ok=True)
        written = _sync_tree(fresh, dest)
    stamp_path.write_text(want + "\n")
    print(f"tq: {written} files changed in the patched tree", file=sys.stderr)
    return dest


def python_patch_files() -> list[Path]:
    return sorted(PYTHON_PATCHES_DIR.glob("*.patch"))


def prepare_python_source() -> Path:
    """The pinned llama-cpp-python sdist unpacked and patched by patches/llama-cpp-python/ (the
    Python side of the TQ cache options), for `pip install`: made once per patch set."""
    if shutil.which("git") is None:
        raise UserError("git is needed to apply patches/ (git apply); install git")
    sdist = fetch_sdist()
    digest = hashlib.sha256(UPSTREAM.sdist_sha256.encode())
    for p in python_patch_files():
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    dest = cache_dir() / "llama-cpp-python-src"
    stamp = dest / ".tq-patched"
    if stamp.exists() and stamp.read_text().strip() == digest.hexdigest():
        return dest / UPSTREAM.vendor_prefix.split("/")[0]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
    root = dest / UPSTREAM.vendor_prefix.split("/")[0]
    for p in python_patch_files():
        check = subprocess.run(["git", "apply", "--check", "-p1", str(p)], cwd=root, capture_output=True, text=True,
                               errors="replace")
        if check.returncode != 0:
            raise UserError(f"patch {p.relative_to(REPO_ROOT)} does not apply to {UPSTREAM.package}=={UPSTREAM.version}:\n"
                            f"{check.stderr.strip()}")
        subprocess.run(["git", "apply", "-p1", str(p)], cwd=root, check=True)
    stamp.write_text(digest.hexdigest() + "\n")
    return root


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack-upstream", help="write the compact pinned llama.cpp tarball (to carry to the GPU machine)")
    p.add_argument("--output", type=Path, default=None, help=f"default: <cache>/{COMPACT_NAME}")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("prepare", help="fetch the pinned sdist, check it and apply patches/ (no build)")
    p.add_argument("--upstream-tarball", type=Path, default=None,
                   help="a tarball from `tq pack-upstream` instead of the sdist (machines without network)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_pack(args: argparse.Namespace) -> int:
    out = pack_upstream(args.output or cache_dir() / COMPACT_NAME)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    print(prepare_tree(args.upstream_tarball))
    return 0
