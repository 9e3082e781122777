"""Text-classification datasets that ship offline, with deterministic splits from a seed.

Registered (``register_dataset``, next to the image sets of ``tasks.common.datasets``):

- ``fine_foods``: ``small_fine_foods`` from Debian ``r-cran-modeldata`` (1.1.0): Amazon Fine Food
  reviews, 4,000 training and 1,000 test rows, label ``score`` in (great, other); the test split is
  658 great / 342 other. ``<br />`` tags in the reviews become newlines; nothing else is changed.
- ``fortunes``: BSD fortune(6) quotes from Debian ``fortunes`` + ``fortunes-min``, 15,218 quotes in
  43 categories (people 1251, definitions 1203, ... pratchett 2); no official test split.

Both packages are fetched without root (``apt-get download`` + ``dpkg -x``) into the same cache as
Fashion-MNIST (``$SQUEEZELAB_CACHE``, default ``~/.cache/squeezelab``), once, under a file lock:
``tasks.common.datasets.debian_data_path`` does it. The R data sit in a lazy-load DB
(``Rdata.rdb``/``.rdx``) that ``read_r_lazy`` reads with the pure-Python PyPI ``rdata``; R is not needed.

Registered loaders return a different type from the image ones: ``RawText`` (``kind == "text"``)
instead of ``RawDataset``, so ``tasks.common.datasets.load_dataset`` stays image-only and text goes
through ``load_text_dataset`` here, which returns ``TextSplits`` (``kind == "text"``). A caller holding
a name of either kind dispatches on ``getattr(lookup("dataset", name)(), "kind", "image")``.
Splits are made exactly as for images: the validation split is stratified and carved out of the
training part with ``seed``; a source without an official test split first loses a stratified
``test_fraction`` chosen by ``10_000 + seed``.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tasks.common.datasets import DatasetUnavailable, debian_data_path, stratified_split
from tasks.common.registry import lookup, register_dataset

MODELDATA = "/usr/lib/R/site-library/modeldata/data/Rdata"  # lazy-load DB prefix inside r-cran-modeldata


# --- reading R lazy-load DBs (r-cran-modeldata, r-cran-janeaustenr, ...) ----------------------------

def _unzip_entry(blob: bytes) -> bytes:
    """One ``.rdb`` entry: 4-byte big-endian length, then a type byte (Z=LZMA2 raw, 2=bz2, 0=stored,
    anything else: the type byte is the first byte of a zlib stream)."""
    n, kind = struct.unpack(">I", blob[:4])[0], blob[4:5]
    if kind == b"Z":
        out = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW,
                              filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    elif kind == b"2":
        out = bz2.decompress(blob[5:])
    elif kind == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise ValueError(f"corrupt R lazy-load entry: {len(out)} bytes, header says {n}")
    return out


def _parse_rds(raw: bytes) -> Any:
    try:
        import rdata
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise DatasetUnavailable("reading R data needs the PyPI package rdata: pip install rdata") from e
    with warnings.catch_warnings():  # "Missing constructor for R class tbl_df": tibbles read as data.frame
        warnings.filterwarnings("ignore", message="Missing constructor for R class")
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def read_r_lazy(prefix: str | Path, name: str | None = None) -> Any:
    """Object ``name`` from the R lazy-load DB ``prefix.rdb``/``prefix.rdx`` (a data.frame comes back
    as a pandas DataFrame); with no name, the list of object names."""
    prefix = str(prefix)
    index = _parse_rds(gzip.decompress(Path(prefix + ".rdx").read_bytes()))["variables"]
    if name is None:
        return [str(k) for k in index]
    if name not in index:
        raise KeyError(f"{name!r} is not in {prefix}.rdb; it holds {sorted(map(str, index))}")
    offset, length = (int(x) for x in index[name])
    with open(prefix + ".rdb", "rb") as f:
        f.seek(offset)
        return _parse_rds(_unzip_entry(f.read(length)))


# --- registered sources ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawText:
    texts: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    test_texts: tuple[str, ...] | None = None  # an official test split, when the source has one
    test_labels: np.ndarray | None = None
    source: str = ""
    synthetic: bool = False
    kind: str = "text"


def _frame_texts_labels(frame) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    texts = tuple(str(r).replace("<br />", "\n") for r in frame["review"])
    score = frame["score"].astype("category")
    return texts, score.cat.codes.to_numpy().astype(np.int64), tuple(str(c) for c in score.cat.categories)


@register_dataset("fine_foods")
def fine_foods() -> RawText:
    rdx = debian_data_path("r-cran-modeldata", MODELDATA + ".rdx")
    prefix = str(rdx)[: -len(".rdx")]
    x, y, classes = _frame_texts_labels(read_r_lazy(prefix, "training_data"))
    tx, ty, test_classes = _frame_texts_labels(read_r_lazy(prefix, "testing_data"))
    if classes != test_classes:
        raise ValueError(f"fine_foods train/test label levels differ: {classes} vs {test_classes}")
    return RawText(x, y, classes, tx, ty, source="Debian r-cran-modeldata small_fine_foods")


FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNES_MIN = ("fortunes", "literature", "riddles")  # the categories in Debian fortunes-min
FORTUNE_CATEGORIES = tuple(sorted(FORTUNES_MIN + (  # the rest are in Debian fortunes
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs",
    "education", "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd", "law", "linux",
    "linuxcookie", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum",
    "people", "perl", "pets", "platitudes", "politics", "pratchett", "science", "songs-poems", "sports",
    "startrek", "tao", "translate-me", "wisdom", "work", "zippy")))


@register_dataset("fortunes")
def fortunes() -> RawText:
    texts, labels = [], []
    for label, category in enumerate(FORTUNE_CATEGORIES):
        package = "fortunes-min" if category in FORTUNES_MIN else "fortunes"
        body = debian_data_path(package, f"{FORTUNE_DIR}/{category}").read_text(encoding="utf-8", errors="replace")
        quotes = [q.strip() for q in body.split("\n%\n") if q.strip()]
        texts += quotes
        labels += [label] * len(quotes)
    return RawText(tuple(texts), np.asarray(labels, np.int64), FORTUNE_CATEGORIES,
                   source="Debian fortunes + fortunes-min")


# --- splits ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSplits:
    name: str
    classes: tuple[str, ...]
    train_texts: list[str]
    train_y: np.ndarray  # int64
    val_texts: list[str]
    val_y: np.ndarray
    test_texts: list[str]
    test_y: np.ndarray
    source: str
    synthetic: bool = False
    kind: str = "text"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _take(texts: Sequence[str], idx: np.ndarray) -> list[str]:
    return [texts[i] for i in idx]


def load_text_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1,
                      test_fraction: float = 0.2) -> TextSplits:
    """Deterministic train/val/test splits of a registered text dataset, made as ``load_dataset``
    makes them for images: ``test_fraction`` only when the source has no official test split."""
    raw = lookup("dataset", name)()
    if getattr(raw, "kind", "image") != "text":
        raise TypeError(f"dataset {name!r} is not a text dataset; use tasks.common.datasets.load_dataset")
    if raw.test_texts is not None:
        x, y, tx, ty = list(raw.texts), raw.labels, list(raw.test_texts), raw.test_labels
    else:
        rest, test = stratified_split(raw.labels, test_fraction, seed=10_000 + seed)
        x, y = _take(raw.texts, rest), raw.labels[rest]
        tx, ty = _take(raw.texts, test), raw.labels[test]
    train, val = stratified_split(y, val_fraction, seed=seed)
    return TextSplits(name, raw.classes, _take(x, train), y[train], _take(x, val), y[val], tx, ty,
                      source=raw.source, synthetic=raw.synthetic)


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [len(texts), max_length]: every text is truncated to
    ``max_length`` tokens ([CLS] and [SEP] included) and right-padded with the pad id (mask 0)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_attention_mask=True, return_token_type_ids=False)
    return (np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), max_length),
            np.asarray(enc["attention_mask"], dtype=np.int64).reshape(len(texts), max_length))
