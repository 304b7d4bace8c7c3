"""The commit-reveal rules every chain implementation applies, in one place so that LocalChain
(which enforces them on write) and BittensorChain (which checks them before sending and on
reading) refuse the same things with the same messages."""

from __future__ import annotations

import re

from subnet.chain.base import ChainError
from subnet.chain.signing import digest_of
from subnet.rounds import RoundSchedule

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: str, what: str) -> None:
    if not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest):
        raise ChainError(f"{what}: digest must be a lowercase hex sha256 (64 characters), got {digest!r}")


def check_commit_block(schedule: RoundSchedule, round: int, block: int, what: str) -> None:
    _check_round(round, what)
    window = schedule.commit_window(round)
    if block not in window:
        raise ChainError(f"{what} at block {block} is outside its commit window: blocks "
                         f"{window.start}..{window.stop - 1} (the train and commit phases of round {round})")


def check_reveal_block(schedule: RoundSchedule, round: int, block: int, what: str) -> None:
    _check_round(round, what)
    window = schedule.reveal_window(round)
    if block not in window:
        raise ChainError(f"{what} at block {block} is outside its reveal window: blocks "
                         f"{window.start}..{window.stop - 1} (the reveal phase of round {round})")


def check_reveal_matches(data: str, digest: str, what: str) -> None:
    if digest_of(data) != digest:
        raise ChainError(f"{what}: revealed data does not match the commitment: sha256(data) is "
                         f"{digest_of(data)}, committed digest is {digest}")


def _check_round(round: int, what: str) -> None:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ChainError(f"{what}: round must be an integer >= 0, got {round!r}")
