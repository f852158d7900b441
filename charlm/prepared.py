"""Prepared data: the split, the vocabulary and the encoded arrays, stored once per content.

A store is a directory (``$CHARLM_HOME``, default ``.charlm``) laid out as::

    corpora/<sha256>                         the fetched bytes, as fetched
    prepared/<sha256[:16]>-<settings>/       one directory per (corpus, preparation settings)
        vocab.json  stats.json  train.pt  valid.pt

Both are content-addressed: a directory that exists is complete (it is written
under a temporary name and renamed into place), so :func:`write` returns at once
when it finds one, and there is no other cache to keep in step with it.
Training code receives a :class:`PreparedRef` — where the files are and what they
were made from — never the text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from pydantic import BaseModel, ConfigDict, Field

from charlm.config import RunConfig
from charlm.data import PreparedCorpus, Vocabulary, decode_corpus, prepare_corpus
from charlm.storage import FetchedCorpus

HOME_ENV = "CHARLM_HOME"
FILES = ("vocab.json", "stats.json", "train.pt", "valid.pt")


def store_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$CHARLM_HOME``, else ``./.charlm`` — as an absolute path."""
    return Path(root or os.environ.get(HOME_ENV) or ".charlm").resolve()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusRef(_Frozen):
    """A fetched corpus, by reference: where it came from, what it is, where its bytes are kept."""

    uri: str
    sha256: str
    size: int = Field(ge=0, description="bytes")
    etag: str | None = None
    endpoint_url: str | None = Field(None, description="the S3-compatible store it came from (MinIO, Ceph)")
    path: str = Field(description="the stored copy of the bytes (corpora/<sha256> in the store)")

    @property
    def resolved_uri(self) -> str:
        """The URI, a local path made absolute (what the records name as the source)."""
        scheme = urlparse(self.uri).scheme
        if scheme == "file":
            return self.uri
        return self.uri if scheme else Path(self.uri).resolve().as_uri()

    def read_text(self) -> str:
        return decode_corpus(Path(self.path).read_bytes(), self.uri)


class PrepSettings(_Frozen):
    """What prepared data depends on besides the corpus: read from a run's data config."""

    valid_fraction: float = 0.2
    lowercase: bool = False
    min_freq: int = 1

    @classmethod
    def of(cls, config: RunConfig) -> PrepSettings:
        d = config.data
        return cls(valid_fraction=d.valid_fraction, lowercase=d.lowercase, min_freq=d.min_freq)

    @property
    def task(self) -> str:
        """What a validation loss measures, in words: losses of one task compare, of two do not."""
        case = "lowercased" if self.lowercase else "case-sensitive"
        return f"{case}, min_freq {self.min_freq}, last {self.valid_fraction:.0%} validation"

    def key(self, sha256: str) -> str:
        """The directory name for this corpus digest and these settings."""
        parts = "-".join(f"{k}{v}" for k, v in sorted(self.model_dump().items()))
        return f"{sha256[:16]}-{parts}".replace(".", "_")


class PreparedRef(_Frozen):
    """Prepared data on disk: the corpus it came from, the settings, the directory and its statistics."""

    corpus: CorpusRef
    settings: PrepSettings
    dir: str
    stats: dict[str, Any]

    @property
    def key(self) -> str:
        return Path(self.dir).name


def store_corpus(
    fetched: FetchedCorpus, root: str | os.PathLike[str] | None = None, endpoint_url: str | None = None
) -> CorpusRef:
    """Keep the fetched bytes under ``corpora/<sha256>`` (once) and return the reference."""
    path = store_root(root) / "corpora" / fetched.sha256
    if not path.is_file():
        _atomic_dir_write(path, lambda tmp: Path(tmp).write_bytes(fetched.raw), is_file=True)
    return CorpusRef(
        uri=fetched.uri,
        sha256=fetched.sha256,
        size=fetched.size,
        etag=fetched.etag,
        endpoint_url=endpoint_url,
        path=str(path),
    )


def write(corpus: CorpusRef, settings: PrepSettings, root: str | os.PathLike[str] | None = None) -> PreparedRef:
    """Prepare ``corpus`` with ``settings`` into the store, unless that directory is already there."""
    out = store_root(root) / "prepared" / settings.key(corpus.sha256)
    if not _complete(out):
        text = corpus.read_text()

        def fill(tmp: str) -> None:
            prepared = prepare_corpus(text, **settings.model_dump())
            prepared.vocab.save(Path(tmp) / "vocab.json")
            torch.save(prepared.train, Path(tmp) / "train.pt")
            torch.save(prepared.valid, Path(tmp) / "valid.pt")
            stats = {**prepared.stats(), **settings.model_dump(), "sha256": corpus.sha256, "prepared_at": time.time()}
            (Path(tmp) / "stats.json").write_text(json.dumps(stats, indent=1))

        if out.exists():  # incomplete: files were deleted by hand
            shutil.rmtree(out)
        _atomic_dir_write(out, fill)
    stats = json.loads((out / "stats.json").read_text())
    return PreparedRef(corpus=corpus, settings=settings, dir=str(out), stats=stats)


def prepare(uri: str, config: RunConfig, root: str | os.PathLike[str] | None = None, **fetch: Any) -> PreparedRef:
    """Fetch ``uri`` (see :func:`charlm.storage.fetch_corpus`), keep it and prepare it for ``config``."""
    from charlm.storage import fetch_corpus

    return write(store_corpus(fetch_corpus(uri, **fetch), root), PrepSettings.of(config), root)


def load(directory: str | os.PathLike[str]) -> PreparedCorpus:
    """The prepared corpus in ``directory`` (a :attr:`PreparedRef.dir`)."""
    d = Path(directory)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: prepared files missing: {', '.join(missing)}")
    return PreparedCorpus(
        vocab=Vocabulary.load(d / "vocab.json"),
        train=torch.load(d / "train.pt", weights_only=True),
        valid=torch.load(d / "valid.pt", weights_only=True),
    )


def prepare_for(config: RunConfig, text: str) -> PreparedCorpus:
    """Prepare a text in memory with the preparation settings of ``config``."""
    return prepare_corpus(text, **PrepSettings.of(config).model_dump())


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def _atomic_dir_write(final: Path, fill: Any, is_file: bool = False) -> None:
    """Fill a temporary file or directory beside ``final``, then rename it into place.
    A concurrent writer that got there first wins; its content is the same."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_file:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    else:
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        fill(tmp)
        if is_file:
            os.replace(tmp, final)
        else:
            os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        if Path(tmp).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif Path(tmp).exists():
            Path(tmp).unlink()
