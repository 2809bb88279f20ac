"""turboquant-llama: TurboQuant KV-cache types for llama.cpp (Python tools)."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# The repository root: pytools/ is installed in editable mode, so sources, patches and the
# generated header are found next to the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
