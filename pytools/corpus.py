"""The evaluation text that ships with the package: WikiText-2 raw test (pytools/data/, xz, with
its licence note), decompressed once into the cache folder and checked against its sha256.

`tq eval quality` and `tq eval niah` read it unless --corpus/--filler or TQ_CORPUS name another
file; the tests read it through wikitext2_test_path(), so nothing depends on a file outside the
repository."""

from __future__ import annotations

import lzma
import os
from pathlib import Path

from .errors import UserError
from .upstream import cache_dir, sha256_file

DATA_DIR = Path(__file__).resolve().parent / "data"
WIKITEXT2_TEST_XZ = DATA_DIR / "wiki.test.raw.xz"
WIKITEXT2_TEST_NAME = "wiki.test.raw"   # results record the corpus by this name
WIKITEXT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def wikitext2_test_path() -> Path:
    """The WikiText-2 raw test text as a plain file (<cache>/corpus/wiki.test.raw), decompressed
    from the package on first use; UserError when the shipped file does not match its sha256."""
    target = cache_dir() / "corpus" / WIKITEXT2_TEST_NAME
    if target.is_file() and sha256_file(target) == WIKITEXT2_TEST_SHA256:
        return target
    if not WIKITEXT2_TEST_XZ.is_file():
        raise UserError(f"the packaged evaluation text {WIKITEXT2_TEST_XZ} is missing")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")   # concurrent first uses do not collide
    try:
        with lzma.open(WIKITEXT2_TEST_XZ) as src, open(part, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
    except (lzma.LZMAError, EOFError) as exc:
        part.unlink(missing_ok=True)
        raise UserError(f"{WIKITEXT2_TEST_XZ} is damaged: {exc}") from None
    if sha256_file(part) != WIKITEXT2_TEST_SHA256:
        part.unlink()
        raise UserError(f"{WIKITEXT2_TEST_XZ} does not decompress to the WikiText-2 test text "
                        f"(sha256 {WIKITEXT2_TEST_SHA256})")
    part.replace(target)
    return target


def default_corpus() -> Path:
    """The evaluation text of `tq eval`: TQ_CORPUS when set, else the packaged WikiText-2 test."""
    override = os.environ.get("TQ_CORPUS")
    if override:
        path = Path(override)
        if not path.is_file():
            raise UserError(f"TQ_CORPUS={override} is not a file")
        return path
    return wikitext2_test_path()


def is_packaged(path: Path) -> bool:
    """Whether path is the packaged WikiText-2 test text (a recorded command then need not name it)."""
    return Path(path).resolve() == (cache_dir() / "corpus" / WIKITEXT2_TEST_NAME).resolve()
