"""The tokenized corpus and its on-disk cache.

Layout under ``cache_dir``::

    corpus-<key>/tokenizer.json          the BPE tokenizer (trained on the train split only)
    corpus-<key>/<domain>.<split>.npy    token ids, every document followed by EOS
    corpus-<key>/meta.json               settings, per-document offsets/token/byte counts

``key`` is a sha256 of the format version, the settings and the content of every document
with its split. A cache is built in a ``.tmp-*`` folder and moved into place with one
``os.replace``, so a reader only ever sees a complete cache; ``meta.json`` is written last
and every array is checked against it on load (anything odd: rebuild).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .config import CorpusConfig
from .sources import Document, domain_documents
from .split import split_domain
from .tokenizer import TOKENIZER_FILE, BPETokenizer, atomic_write_bytes

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE = "meta.json"
_STALE_TMP_SECONDS = 6 * 3600

Progress = Callable[[str], None] | None


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(f"[data] {msg}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def cache_key(cfg: CorpusConfig, splits: dict[str, tuple[list[Document], list[Document]]]) -> str:
    content = hashlib.sha256()
    for domain, parts in splits.items():
        for split, docs in zip(SPLITS, parts):
            content.update(f"\x01{domain}\x00{split}\x00{len(docs)}\x00".encode())
            for d in docs:
                data = d.text.encode("utf-8")
                content.update(f"\x02{d.doc_id}\x00{len(data)}\x00".encode())
                content.update(data)
    settings = {
        "format": FORMAT_VERSION,
        "vocab_size": cfg.vocab_size,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "max_bytes_per_domain": cfg.max_bytes_per_domain,
        "domains": cfg.all_domains,
        "content": content.hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class Corpus:
    """A built (or cache-loaded) corpus: tokenizer + token arrays per (split, domain)."""

    def __init__(self, root: Path, meta: dict, tokenizer: BPETokenizer, cache_hit: bool):
        self.root = Path(root)
        self.meta = meta
        self.tokenizer = tokenizer
        self.cache_hit = cache_hit
        self.key: str = meta["key"]
        self.domains: list[str] = list(meta["domains"])
        self.vocab_size: int = tokenizer.vocab_size
        self.eos_id: int = tokenizer.eos_id
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_FILE

    @staticmethod
    def load_tokenizer(path: str | os.PathLike) -> BPETokenizer:
        """Load a saved ``tokenizer.json`` (or a folder holding one) without building a corpus."""
        return BPETokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ data
    def _entry(self, split: str, domain: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this corpus has {self.domains}")
        return self.meta["splits"][domain][split]

    def tokens(self, split: str, domain: str) -> np.ndarray:
        """Read-only memory-mapped token ids of one (split, domain): docs joined, EOS after each."""
        entry = self._entry(split, domain)
        arr = self._arrays.get((split, domain))
        if arr is None:
            if entry["n_tokens"] == 0:
                arr = np.zeros(0, dtype=np.dtype(self.meta["dtype"]))
            else:
                arr = np.load(self.root / entry["file"], mmap_mode="r")
            self._arrays[(split, domain)] = arr
        return arr

    def n_tokens(self, split: str, domain: str) -> int:
        return int(self._entry(split, domain)["n_tokens"])

    def n_bytes(self, split: str, domain: str) -> int:
        return int(self._entry(split, domain)["n_bytes"])

    def bytes_per_token(self, split: str, domain: str) -> float:
        """UTF-8 bytes of the documents / tokens in the array (EOS separators included).

        bits-per-byte = loss_nats / ln(2) / bytes_per_token.
        """
        entry = self._entry(split, domain)
        if entry["n_tokens"] == 0:
            raise ValueError(f"the {split!r} split of domain {domain!r} is empty")
        return entry["n_bytes"] / entry["n_tokens"]

    def documents(self, split: str, domain: str) -> list[str]:
        return [d["id"] for d in self._entry(split, domain)["docs"]]

    def document_spans(self, split: str, domain: str) -> list[tuple[str, int, int]]:
        """(doc id, start offset, n_tokens without the trailing EOS) per document."""
        return [(d["id"], d["offset"], d["n_tokens"]) for d in self._entry(split, domain)["docs"]]

    def stats(self) -> dict:
        """{domain: {split: {"docs", "bytes", "tokens", "bytes_per_token"}}}."""
        out: dict = {}
        for dom in self.domains:
            for split in SPLITS:
                e = self._entry(split, dom)
                out.setdefault(dom, {})[split] = {
                    "docs": len(e["docs"]),
                    "bytes": e["n_bytes"],
                    "tokens": e["n_tokens"],
                    "bytes_per_token": round(e["n_bytes"] / e["n_tokens"], 3) if e["n_tokens"] else None,
                }
        return out

    def summary(self) -> str:
        lines = [f"corpus {self.key[:12]} vocab={self.vocab_size} eos={self.eos_id} at {self.root}"]
        for dom, per in self.stats().items():
            for split, s in per.items():
                lines.append(
                    f"  {dom:>9} {split:>5}: {s['docs']:6d} docs {s['bytes']:11,d} bytes "
                    f"{s['tokens']:10,d} tokens ({s['bytes_per_token']} B/tok)"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Corpus(domains={self.domains}, vocab_size={self.vocab_size}, root={str(self.root)!r})"


# ---------------------------------------------------------------------- cache I/O


def _load_cached(root: Path, key: str) -> Corpus | None:
    """The cached corpus at ``root`` if it is complete and consistent, else None."""
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
            return None
        tok = BPETokenizer.from_file(root / TOKENIZER_FILE)
        if tok.vocab_size != meta["vocab_size"] or tok.eos_id != meta["eos_id"]:
            return None
        dtype = np.dtype(meta["dtype"])
        for dom in meta["domains"]:
            for split in SPLITS:
                e = meta["splits"][dom][split]
                if e["n_tokens"] == 0:
                    continue
                arr = np.load(root / e["file"], mmap_mode="r")
                if arr.shape != (e["n_tokens"],) or arr.dtype != dtype:
                    return None
    except Exception:  # noqa: BLE001 - unreadable, truncated or inconsistent: treat as absent
        return None
    return Corpus(root, meta, tok, cache_hit=True)


def _clean_stale_tmp(cache_dir: Path) -> None:
    now = time.time()
    for p in cache_dir.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _write_cache(
    cfg: CorpusConfig,
    key: str,
    splits: dict[str, tuple[list[Document], list[Document]]],
    tmp: Path,
    progress: Progress,
) -> None:
    tmp.mkdir(parents=True)
    train_texts = [d.text for train, _ in splits.values() for d in train]
    mb = sum(len(t.encode("utf-8")) for t in train_texts) / 1e6
    _say(progress, f"training byte-level BPE (vocab {cfg.vocab_size}) on {mb:.1f} MB of train text")
    t = time.perf_counter()
    tok = BPETokenizer.train(train_texts, cfg.vocab_size)
    del train_texts
    tok.save(tmp / TOKENIZER_FILE)
    _say(progress, f"tokenizer trained in {time.perf_counter() - t:.1f}s (vocab {tok.vocab_size})")

    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    meta_splits: dict = {}
    t = time.perf_counter()
    for dom, parts in splits.items():
        for split, docs in zip(SPLITS, parts):
            pieces, entries, offset, n_bytes = [], [], 0, 0
            for doc, ids in zip(docs, tok.encode_batch([d.text for d in docs])):
                arr = np.asarray(ids, dtype=dtype)
                b = doc.nbytes
                entries.append({"id": doc.doc_id, "offset": offset, "n_tokens": len(arr), "n_bytes": b})
                pieces += [arr, eos]
                offset += len(arr) + 1
                n_bytes += b
            fname = f"{dom}.{split}.npy"
            data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
            with open(tmp / fname, "wb") as f:
                np.save(f, data)
            meta_splits.setdefault(dom, {})[split] = {
                "file": fname,
                "n_tokens": len(data),
                "n_bytes": n_bytes,
                "docs": entries,
            }
            _say(progress, f"{dom}/{split}: {len(docs)} docs, {n_bytes:,} bytes -> {len(data):,} tokens")
    _say(progress, f"encoded in {time.perf_counter() - t:.1f}s")

    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "domains": list(splits),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "settings": {
            "vocab_size": cfg.vocab_size,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "max_bytes_per_domain": cfg.max_bytes_per_domain,
            "user_paths": list(cfg.user_paths),
        },
        "created": time.time(),
        "splits": meta_splits,
    }
    atomic_write_bytes(tmp / META_FILE, json.dumps(meta, indent=1).encode("utf-8"))
    # Make the file contents durable before the directory rename publishes them.
    for p in tmp.iterdir():
        if p.suffix == ".npy":
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def build_corpus(cfg: CorpusConfig, progress: Progress = None) -> Corpus:
    """Read the sources, split them, then load the matching cache or build it."""
    t0 = time.perf_counter()
    splits: dict[str, tuple[list[Document], list[Document]]] = {}
    for dom in cfg.all_domains:
        docs = domain_documents(dom, cfg.user_paths, cfg.max_bytes_per_domain)
        splits[dom] = split_domain(dom, docs, cfg.val_fraction, cfg.seed)
    key = cache_key(cfg, splits)
    cache_dir = cfg.cache_path
    root = cache_dir / f"corpus-{key[:24]}"
    _say(
        progress,
        f"read {sum(len(a) + len(b) for a, b in splits.values())} documents "
        f"in {time.perf_counter() - t0:.2f}s (cache key {key[:12]})",
    )

    corpus = _load_cached(root, key) if root.exists() else None
    if corpus is not None:
        _say(progress, f"loaded cached corpus {root} in {time.perf_counter() - t0:.2f}s")
        return corpus

    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache_dir)
    tmp = cache_dir / f".tmp-{key[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_cache(cfg, key, splits, tmp, progress)
        if root.exists() and _load_cached(root, key) is None:  # a broken cache: move it away
            stale = cache_dir / f".tmp-stale-{uuid.uuid4().hex[:8]}"
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:  # fails when another process published the same key first: use theirs
            os.replace(tmp, root)
        except OSError:
            if _load_cached(root, key) is None:  # pragma: no cover - racing writers
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    corpus = _load_cached(root, key)
    if corpus is None:  # pragma: no cover - would be a bug in the writer
        raise RuntimeError(f"corpus cache at {root} failed validation right after being written")
    corpus.cache_hit = False
    _say(progress, f"built corpus {root} in {time.perf_counter() - t0:.1f}s")
    return corpus


def corpus_domains(cfg: CorpusConfig) -> Sequence[str]:
    """The domain names a corpus built from ``cfg`` will have, without building it."""
    return cfg.all_domains
