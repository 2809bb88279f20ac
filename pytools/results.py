"""The one writer of results files (`tq eval quality`, `tq eval niah`, `tq bench`, `tq
python-agreement`): <out-dir>/<stem>.json, .md and .png, each JSON carrying the command that made
it, with every switch that was set (switches.py), and the date.

The measurement modules render their own Markdown and plots; this module names the files, writes
them and builds the recorded command the same way for all of them."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from . import switches
from .errors import UserError


def model_label(model: str) -> str:
    """The name results files carry: a manifest name as given, a GGUF path without its folder and
    .gguf (not Path.stem, which would cut qwen2.5-coder-0.5b at its last dot)."""
    name = Path(model).name
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def safe_name(text: str) -> str:
    """text with every run of characters other than letters, digits, '.', '_', '-' made one '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def now() -> str:
    """The local time with its UTC offset, to the second (results' "date")."""
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def clean(value):
    """NaN and infinities as None (JSON has no NaN), in nested dicts and lists."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def command(parts: list[str], setting: Mapping[str, switches.Value]) -> str:
    """The shell command that makes a results file again: tq's arguments (parts), the TQ cache
    options that differ from their defaults as tq arguments, the knobs as variables before it."""
    return switches.tq_command(parts, setting)


def load_json(path: Path) -> dict | list | None:
    """A results file's JSON, None when there is none; UserError when it is not JSON."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); move it away to start a new results file") from None


@dataclass(frozen=True)
class ResultFiles:
    out_dir: Path
    stem: str

    def path(self, ext: str) -> Path:
        # not with_suffix: a model name such as qwen2.5-coder-0.5b has a dot of its own
        return self.out_dir / f"{self.stem}.{ext}"

    @property
    def json(self) -> Path:
        return self.path("json")

    @property
    def md(self) -> Path:
        return self.path("md")

    @property
    def png(self) -> Path:
        return self.path("png")


def write(files: ResultFiles, data: dict | list, markdown: str | None = None,
          plot: Callable[[Path], None] | None = None) -> list[Path]:
    """Write the JSON (NaN as null), the Markdown and the plot of one results file; the paths written."""
    files.out_dir.mkdir(parents=True, exist_ok=True)
    files.json.write_text(json.dumps(clean(data), indent=1, ensure_ascii=False) + "\n")
    written = [files.json]
    if markdown is not None:
        files.md.write_text(markdown)
        written.append(files.md)
    if plot is not None:
        plot(files.png)
        written.append(files.png)
    return written


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
