"""Deterministic train/validation split by document."""

from __future__ import annotations

import hashlib

from .sources import Document


def doc_score(seed: int, domain: str, doc_id: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, domain, document id)."""
    h = hashlib.sha256(f"{seed}\x00{domain}\x00{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def min_val_docs(n_docs: int) -> int:
    """At least 1 validation document when there are 2 or more, at least 2 when 20 or more."""
    if n_docs >= 20:
        return 2
    if n_docs >= 2:
        return 1
    return 0


def _cut_document(doc: Document, val_fraction: float) -> tuple[Document, Document] | None:
    """Split a lone document into a head (train) and a tail (val), at a line end if possible."""
    text = doc.text
    if len(text.strip()) < 2:
        return None
    target = max(1, min(len(text) - 1, round(len(text) * (1.0 - val_fraction))))
    cut = text.rfind("\n", 0, target) + 1
    if cut <= 0 or not text[:cut].strip() or not text[cut:].strip():
        nxt = text.find("\n", target) + 1
        cut = nxt if 0 < nxt < len(text) and text[nxt:].strip() else target
    head, tail = text[:cut], text[cut:]
    if not head.strip() or not tail.strip():
        return None
    return Document(f"{doc.doc_id}@train", head), Document(f"{doc.doc_id}@val", tail)


def split_domain(
    domain: str, docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Return (train, val) documents, each in their original order.

    A document goes to validation when its hash score is below ``val_fraction``; then the
    lowest-scoring training documents are moved over until :func:`min_val_docs` is met, and
    if everything landed in validation the highest-scoring one goes back to training. A domain
    made of a single document has that document cut in two (head: train, tail: val).
    """
    n = len(docs)
    if n == 1:
        parts = _cut_document(docs[0], val_fraction)
        return ([parts[0]], [parts[1]]) if parts else (list(docs), [])
    scores = [doc_score(seed, domain, d.doc_id) for d in docs]
    is_val = [s < val_fraction for s in scores]
    order = sorted(range(n), key=lambda i: (scores[i], docs[i].doc_id))
    need = min_val_docs(n) - sum(is_val)
    for i in order:
        if need <= 0:
            break
        if not is_val[i]:
            is_val[i] = True
            need -= 1
    if n >= 2 and all(is_val):
        is_val[order[-1]] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val
