"""Secure aggregation with real cryptography: exact sums within the quantization bound, dropouts at every
phase, and what the server and too few parties can learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedloom.privacy import shamir
from fedloom.privacy.quantize import Quantizer
from fedloom.privacy.secagg import SecAggClient, SecAggError, SecAggServer, neighbourhoods


def run_round(
    updates: dict[int, np.ndarray], threshold: int, drop_after_sharing=(), drop_after_masking=(), degree=None
) -> tuple[np.ndarray, Quantizer, list[int]]:
    """One round over in-memory message passing; parties in ``drop_after_sharing`` never send their masked input,
    those in ``drop_after_masking`` never answer the unmasking. With ``degree``: SecAgg+ neighbourhoods."""
    length = len(next(iter(updates.values())))
    quantizer = Quantizer(clip=1.0, clients=len(updates))
    clients = {p: SecAggClient(p, threshold, quantizer) for p in updates}
    near = None if degree is None else neighbourhoods(sorted(updates), degree, np.random.default_rng(1))
    server = SecAggServer(threshold, quantizer, length, near)
    server.collect_keys({p: c.advertise() for p, c in clients.items()})
    sent = {p: c.share_keys(server.roster_for(p)) for p, c in clients.items()}
    assert all(len(box) == (degree or len(updates) - 1) for box in sent.values())  # whom each client deals with
    routed = server.route_shares(sent)
    masked = {p: clients[p].masked_input(routed[p], updates[p]) for p in routed if p not in set(drop_after_sharing)}
    survivors = server.collect_masked(masked)
    answers = {p: clients[p].unmask(server.survivors_for(p)) for p in survivors if p not in set(drop_after_masking)}
    return server.unmask(answers), quantizer, survivors


@pytest.mark.parametrize("clients", [10, 50, 100])
@pytest.mark.parametrize("dropped", [0.0, 0.1, 0.3])
def test_the_secure_sum_is_the_plain_sum_within_the_quantization_bound(clients, dropped):
    rng = np.random.default_rng(clients)
    updates = {p: rng.uniform(-1, 1, 200) for p in range(1, clients + 1)}
    gone = int(dropped * clients)
    after_sharing = list(range(1, gone // 2 + 1))
    after_masking = list(range(clients - (gone - gone // 2) + 1, clients + 1))
    total, quantizer, survivors = run_round(updates, clients // 2 + 1, after_sharing, after_masking)
    expected = sum(updates[p] for p in survivors)
    assert survivors == [p for p in updates if p not in after_sharing]
    assert np.max(np.abs(total - expected)) <= quantizer.bound(len(survivors))
    assert quantizer.bound(len(survivors)) < 1e-5


@pytest.mark.parametrize("dropped", [0.0, 0.1])
def test_secagg_plus_sums_exactly_with_each_client_dealing_with_its_neighbours_only(dropped):
    clients, degree = 60, 12  # each client: 12 neighbours, threshold 7 of its 13 (with itself)
    rng = np.random.default_rng(5)
    updates = {p: rng.uniform(-1, 1, 100) for p in range(1, clients + 1)}
    gone = list(range(1, int(dropped * clients) + 1))
    total, quantizer, survivors = run_round(updates, 7, drop_after_sharing=gone, degree=degree)
    expected = sum(updates[p] for p in survivors)
    assert np.max(np.abs(total - expected)) <= quantizer.bound(len(survivors))


def test_too_few_parties_end_the_round_cleanly():
    updates = {p: np.zeros(5) for p in range(1, 6)}
    with pytest.raises(SecAggError, match="only 2 parties sent masked input, below the threshold t=3"):
        run_round(updates, 3, drop_after_sharing=[1, 2, 3])
    with pytest.raises(SecAggError, match="only 2 parties answered the unmasking"):
        run_round(updates, 3, drop_after_masking=[1, 2, 3])


def test_a_masked_update_looks_uniform_to_the_server():
    updates = {p: np.zeros(20_000) for p in range(1, 6)}  # all zeros: only the masks vary
    quantizer = Quantizer(clip=1.0, clients=5)
    clients = {p: SecAggClient(p, 3, quantizer) for p in updates}
    server = SecAggServer(3, quantizer, 20_000)
    roster = server.collect_keys({p: c.advertise() for p, c in clients.items()})
    routed = server.route_shares({p: c.share_keys(roster) for p, c in clients.items()})
    masked = clients[1].masked_input(routed[1], updates[1])
    counts = np.bincount((masked >> np.uint32(28)).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3  # the top 4 bits spread evenly over 16 bins
    plain = quantizer.encode(updates[1])
    assert np.all(plain == plain[0]) and len(np.unique(masked)) > 19_000  # noqa: PT018


def test_fewer_shares_than_the_threshold_reveal_nothing_usable():
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=4, parties=7)
    assert shamir.combine(shares[:4], length=32) == secret
    assert shamir.combine(shares[3:], length=32) == secret
    assert shamir.combine(shares[:3], length=32) != secret
    # Any 3 shares fit every secret alike: for each candidate there is a polynomial through them.
    other = bytes(32)
    fitted = shamir.split(other, threshold=4, parties=7)
    assert shamir.combine(fitted[:4], length=32) == other


def test_a_tampered_share_is_refused():
    quantizer = Quantizer(clip=1.0, clients=3)
    clients = {p: SecAggClient(p, 2, quantizer) for p in (1, 2, 3)}
    roster = {p: c.advertise() for p, c in clients.items()}
    sent = {p: c.share_keys(roster) for p, c in clients.items()}
    box = bytearray(sent[2][1])
    box[-1] ^= 1
    with pytest.raises(SecAggError, match="the shares from party 2 do not decrypt"):
        clients[1].masked_input({2: bytes(box), 3: sent[3][1]}, np.zeros(3))
    with pytest.raises(SecAggError, match="refuses to unmask"):
        clients[3].unmask([3])  # a survivor list below t would let the server unmask one update


def test_the_quantizer_refuses_a_sum_that_could_wrap():
    with pytest.raises(Exception, match="the sum must not wrap"):
        Quantizer(clip=1.0, clients=100, bits=30)
    assert Quantizer(clip=1.0, clients=100).bits == 25
