"""`tq build` stages CMakeLists.txt and ggml_tq/ into the cache: a changed file must look newer than
any object built before the change, or ninja keeps the stale object."""
from __future__ import annotations

import os
import time
from pathlib import Path

from turboquant_llama import build


def _fake_repo(root: Path) -> Path:
    (root / "ggml_tq").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(x)\n")
    (root / "ggml_tq" / "k.cu").write_text("// one\n")
    (root / "ggml_tq" / "same.h").write_text("// unchanged\n")
    return root


def test_changed_source_is_newer_than_objects_built_before(tmp_path, monkeypatch):
    repo = _fake_repo(tmp_path / "repo")
    monkeypatch.setattr(build, "REPO_ROOT", repo)
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path / "cache"))
    staged = build.stage_sources()
    same_mtime = (staged / "ggml_tq" / "same.h").stat().st_mtime_ns

    # the source is edited at t0, and a build that had staged the old copy compiles it after t0
    src = repo / "ggml_tq" / "k.cu"
    src.write_text("// two\n")
    t0 = time.time() - 100
    os.utime(src, (t0, t0))
    obj = tmp_path / "k.cu.o"
    obj.write_text("object of // one")
    os.utime(obj, (t0 + 50, t0 + 50))

    staged = build.stage_sources()
    k = staged / "ggml_tq" / "k.cu"
    assert k.read_text() == "// two\n"
    assert k.stat().st_mtime > obj.stat().st_mtime
    # an unchanged file is not rewritten (no rebuild of what did not change)
    assert (staged / "ggml_tq" / "same.h").stat().st_mtime_ns == same_mtime


def test_removed_source_is_unstaged(tmp_path, monkeypatch):
    repo = _fake_repo(tmp_path / "repo")
    monkeypatch.setattr(build, "REPO_ROOT", repo)
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path / "cache"))
    build.stage_sources()
    (repo / "ggml_tq" / "same.h").unlink()
    staged = build.stage_sources()
    assert not (staged / "ggml_tq" / "same.h").exists()
    assert (staged / "ggml_tq" / "k.cu").exists()
