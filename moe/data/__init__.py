"""Bundled, offline training data: Shakespeare (prose), the KJV Bible (scripture), the Python
stdlib (code) and optional user files, tokenized with a byte-level BPE and cached on disk.

    from moe.data import CorpusConfig, build_corpus, BatchSampler
    corpus = build_corpus(CorpusConfig(), progress=print)
    x, y, domain_ids = BatchSampler(corpus, block_size=128, batch_size=16).next()
"""

from .config import BUILTIN_DOMAINS, EOS_TOKEN, USER_DOMAIN, CorpusConfig
from .corpus import FORMAT_VERSION, SPLITS, Corpus, build_corpus
from .sampler import BatchSampler
from .sources import Document
from .tokenizer import BPETokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "SPLITS",
    "USER_DOMAIN",
    "BPETokenizer",
    "BatchSampler",
    "Corpus",
    "CorpusConfig",
    "Document",
    "build_corpus",
]
