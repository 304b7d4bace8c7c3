"""Pure chain functions: weight normalization, the stake-weighted median, incentives, the signed
payloads and the commit-reveal rules. No Redis, no chain."""

import math

import pytest
from bittensor_wallet import Keypair

from subnet.chain.base import ChainError
from subnet.chain.rules import check_commit_block, check_digest, check_reveal_block, check_reveal_matches
from subnet.chain.signing import commit_payload, digest_of, reveal_payload, verify_signature, weights_payload
from subnet.chain.weights import incentives, normalize_weights, stake_weighted_median
from subnet.rounds import RoundSchedule

ALICE = Keypair.create_from_seed("0x" + "11" * 32)
BOB = Keypair.create_from_seed("0x" + "22" * 32)


# stake-weighted median ------------------------------------------------------------------------

def test_median_with_equal_stakes_is_the_middle_value():
    assert stake_weighted_median([0.1, 0.9, 0.5], [1, 1, 1]) == 0.5
    assert stake_weighted_median([0.9, 0.1, 0.5, 0.3, 0.7], [2, 2, 2, 2, 2]) == 0.5


def test_median_with_an_even_count_is_the_lower_middle_value():
    # Exactly half the stake behind 0.8 is not a majority, so the uid gets 0.2.
    assert stake_weighted_median([0.2, 0.8], [5, 5]) == 0.2
    assert stake_weighted_median([0.4, 0.1, 0.3, 0.2], [1, 1, 1, 1]) == 0.2


def test_median_follows_the_stake_majority():
    assert stake_weighted_median([0.9, 0.1, 0.1], [51, 25, 24]) == 0.9   # one validator holds > half
    assert stake_weighted_median([0.9, 0.1, 0.1], [49, 26, 25]) == 0.1   # a minority cannot raise a uid
    assert stake_weighted_median([0.9, 0.5, 0.1], [40, 20, 40]) == 0.5   # 60% gave at least 0.5


def test_median_ignores_zero_stake_and_input_order():
    assert stake_weighted_median([1.0, 0.3, 0.3], [0, 1, 1]) == 0.3
    assert stake_weighted_median([0.3, 1.0, 0.7], [3, 2, 1]) == stake_weighted_median([1.0, 0.7, 0.3], [2, 1, 3])


@pytest.mark.parametrize("values,stakes,match", [
    ([], [], "of nothing"),
    ([0.1, 0.2], [1], "differ in length"),
    ([math.nan], [1], "finite"),
    ([0.1], [math.inf], "finite"),
    ([0.1], [-1], "non-negative"),
    ([0.1, 0.2], [0, 0], "total stake is zero"),
])
def test_median_refuses_bad_input(values, stakes, match):
    with pytest.raises(ValueError, match=match):
        stake_weighted_median(values, stakes)


# normalization and incentives ---------------------------------------------------------------

def test_normalize_weights_sums_to_one_and_drops_zeros():
    assert normalize_weights([3, 1, 2], [2.0, 0.0, 6.0]) == {3: 0.25, 2: 0.75}


@pytest.mark.parametrize("uids,weights,match", [
    ([1, 2], [1.0], "differ in length"),
    ([1, 1], [1.0, 1.0], "duplicate uids"),
    ([-1], [1.0], "non-negative integers"),
    ([1], [math.nan], "finite and non-negative"),
    ([1], [-0.5], "finite and non-negative"),
    ([1, 2], [0.0, 0.0], "all weights are zero"),
])
def test_normalize_weights_refuses_bad_input(uids, weights, match):
    with pytest.raises(ChainError, match=match):
        normalize_weights(uids, weights)


def test_incentives_are_the_normalized_stake_weighted_median():
    weights = {10: {0: 0.5, 1: 0.5},          # validator uid -> {uid: weight}
               11: {0: 0.2, 1: 0.8},
               12: {0: 1.0}}                  # gave uid 1 nothing: counts as 0
    stakes = {10: 1.0, 11: 1.0, 12: 1.0}
    # uid 0: median of (0.5, 0.2, 1.0) = 0.5; uid 1: median of (0.5, 0.8, 0) = 0.5; uid 2: 0.
    assert incentives(weights, stakes, [0, 1, 2]) == {0: 0.5, 1: 0.5, 2: 0.0}
    # A big stake behind validator 12 makes its view the consensus.
    assert incentives(weights, {10: 1.0, 11: 1.0, 12: 3.0}, [0, 1, 2]) == {0: 1.0, 1: 0.0, 2: 0.0}


def test_incentives_without_staked_voters_are_zero():
    assert incentives({}, {}, [0, 1]) == {0: 0.0, 1: 0.0}
    assert incentives({5: {0: 1.0}}, {5: 0.0}, [0, 1]) == {0: 0.0, 1: 0.0}
    assert incentives({5: {0: 1.0}, 6: {1: 1.0}}, {5: 1.0}, [0, 1]) == {0: 1.0, 1: 0.0}  # 6 has no stake


# signed payloads --------------------------------------------------------------------------

def test_payloads_are_canonical_and_distinct_per_operation_and_hotkey():
    hk = ALICE.ss58_address
    assert commit_payload(hk, 3, "ab") == commit_payload(hk, 3, "ab")
    assert weights_payload(hk, [1, 2], [0.5, 1]) == weights_payload(hk, (1, 2), (0.5, 1.0))
    payloads = {commit_payload(hk, 3, "ab"), reveal_payload(hk, 3, "ab"), commit_payload(hk, 4, "ab"),
                commit_payload(BOB.ss58_address, 3, "ab"), weights_payload(hk, [3], [1.0])}
    assert len(payloads) == 5
    with pytest.raises(ChainError, match="finite"):
        weights_payload(hk, [1], [math.nan])


def test_verify_signature_accepts_the_hotkeys_signature_only():
    hk = ALICE.ss58_address
    payload = commit_payload(hk, 1, "ab")
    verify_signature(hk, payload, ALICE.sign(payload), "commit")
    with pytest.raises(ChainError, match=f"commit: bad signature: not a valid signature by hotkey {hk}"):
        verify_signature(hk, payload, BOB.sign(payload), "commit")
    with pytest.raises(ChainError, match="bad signature"):
        verify_signature(hk, payload, ALICE.sign(commit_payload(hk, 2, "ab")), "commit")
    with pytest.raises(ChainError, match="bad signature"):
        verify_signature(hk, payload, b"\x00" * 10, "commit")
    with pytest.raises(ChainError, match="bad signature"):
        verify_signature("not-an-address", payload, ALICE.sign(payload), "commit")
    with pytest.raises(ChainError, match="signature must be bytes"):
        verify_signature(hk, payload, ALICE.sign(payload).hex(), "commit")


# commit-reveal rules ----------------------------------------------------------------------

SCHEDULE = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)


def test_commit_and_reveal_windows_are_enforced_with_the_window_in_the_message():
    check_commit_block(SCHEDULE, 1, 10, "commit")       # first block of round 1 (train)
    check_commit_block(SCHEDULE, 1, 15, "commit")       # last block of its commit phase
    with pytest.raises(ChainError, match=r"block 16 is outside its commit window: blocks 10..15"):
        check_commit_block(SCHEDULE, 1, 16, "commit")
    check_reveal_block(SCHEDULE, 1, 16, "reveal")
    check_reveal_block(SCHEDULE, 1, 17, "reveal")
    for block in (15, 18):
        with pytest.raises(ChainError, match=rf"block {block} is outside its reveal window: blocks 16..17"):
            check_reveal_block(SCHEDULE, 1, block, "reveal")
    with pytest.raises(ChainError, match="round must be an integer >= 0"):
        check_commit_block(SCHEDULE, -1, 0, "commit")


def test_digest_format_and_match():
    digest = digest_of("manifests/abc.json")
    check_digest(digest, "commit")
    check_reveal_matches("manifests/abc.json", digest, "reveal")
    for bad in (digest.upper(), digest[:-1], "x" * 64, 42):
        with pytest.raises(ChainError, match="lowercase hex sha256"):
            check_digest(bad, "commit")
    with pytest.raises(ChainError, match="does not match the commitment"):
        check_reveal_matches("manifests/other.json", digest, "reveal")
