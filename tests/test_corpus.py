"""The packaged evaluation text: WikiText-2 raw test, decompressed once into the cache, checked
against its sha256; TQ_CORPUS overrides it."""

from __future__ import annotations

import hashlib
import lzma

import pytest

from turboquant_llama import corpus
from turboquant_llama.errors import UserError


def test_packaged_text_decompresses_to_the_published_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    path = corpus.wikitext2_test_path()
    assert path == tmp_path / "corpus" / "wiki.test.raw"
    data = path.read_bytes()
    assert len(data) == 1_290_547 and hashlib.sha256(data).hexdigest() == corpus.WIKITEXT2_TEST_SHA256
    assert data.startswith(b" = Robert Boulter = \r\n")
    mtime = path.stat().st_mtime_ns
    assert corpus.wikitext2_test_path() == path and path.stat().st_mtime_ns == mtime   # decompressed once
    path.write_bytes(b"changed")                                                        # a damaged copy is replaced
    assert hashlib.sha256(corpus.wikitext2_test_path().read_bytes()).hexdigest() == corpus.WIKITEXT2_TEST_SHA256
    assert corpus.is_packaged(path) and not corpus.is_packaged(tmp_path / "other.raw")
    assert (corpus.DATA_DIR / "WIKITEXT-2-LICENSE.md").read_text().count("CC BY-SA 3.0") >= 1


def test_a_wrong_packaged_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    fake = tmp_path / "wiki.test.raw.xz"
    with lzma.open(fake, "wb") as f:
        f.write(b"not wikitext\n")
    monkeypatch.setattr(corpus, "WIKITEXT2_TEST_XZ", fake)
    with pytest.raises(UserError, match="does not decompress to the WikiText-2 test text"):
        corpus.wikitext2_test_path()
    assert not list((tmp_path / "corpus").iterdir())   # nothing half-written is left
    fake.write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        corpus.wikitext2_test_path()


def test_tq_corpus_overrides(tmp_path, monkeypatch):
    text = tmp_path / "mine.txt"
    text.write_text("hello\n")
    monkeypatch.setenv("TQ_CORPUS", str(text))
    assert corpus.default_corpus() == text
    monkeypatch.setenv("TQ_CORPUS", str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="is not a file"):
        corpus.default_corpus()
    monkeypatch.delenv("TQ_CORPUS")
    assert corpus.default_corpus() == corpus.wikitext2_test_path()
