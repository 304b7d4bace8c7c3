"""The compose rehearsal's DNS stand-in answers as a DNS server must, over a real UDP socket."""

import socket
import struct

import pytest

from tests.deploy.dns_stand_in import NameServer, answer


def query(name: str, qtype: int = 1, query_id: int = 0x1234, edns: bool = False) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    # An OPT record (EDNS0) in the additional section, as Prometheus's resolver library sends one.
    opt = b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0) if edns else b""
    return struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 1 if edns else 0) + labels + struct.pack("!HH", qtype, 1) + opt


def parse(answered: tuple[str, bytes] | bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a response with one question."""
    response = answered[1] if isinstance(answered, tuple) else answered
    query_id, flags, questions, answers, _, _ = struct.unpack_from("!6H", response)
    assert flags & 0x8000 and questions == 1
    at = 12
    while response[at]:
        at += 1 + response[at]
    at += 5
    addresses = []
    for _ in range(answers):
        pointer, rtype, rclass, _ttl, length = struct.unpack_from("!HHHIH", response, at)
        assert pointer == 0xC00C and (rtype, rclass, length) == (1, 1, 4)
        addresses.append(socket.inet_ntoa(response[at + 12:at + 16]))
        at += 16
    assert at == len(response)
    return query_id, flags & 0xF, addresses


RECORDS = {"experts": ["10.232.7.12", "10.232.7.13"]}


def test_a_shared_alias_gets_every_address_and_the_query_id_back():
    assert answer(query("Experts."), RECORDS)[0] == "experts"
    assert parse(answer(query("experts.", edns=True), RECORDS)) == (0x1234, 0, ["10.232.7.12", "10.232.7.13"])
    assert parse(answer(query("EXPERTS", query_id=7), RECORDS)) == (7, 0, ["10.232.7.12", "10.232.7.13"])


def test_other_names_are_nxdomain_and_other_types_empty():
    assert parse(answer(query("router"), RECORDS)) == (0x1234, 3, [])
    assert parse(answer(query("experts", qtype=28), RECORDS)) == (0x1234, 0, [])   # AAAA


@pytest.mark.parametrize("bad", [b"", b"\0" * 11, query("experts")[:-3],
                                 query("experts")[:12] + b"\xc0\x0c" + b"\0\1\0\1",   # a pointer in the question
                                 struct.pack("!6H", 1, 0x8100, 1, 0, 0, 0) + query("experts")[12:],  # a response
                                 struct.pack("!6H", 1, 0x2100, 1, 0, 0, 0) + query("experts")[12:]])  # opcode UPDATE
def test_what_is_not_one_question_is_dropped(bad):
    assert answer(bad, RECORDS) is None


def test_it_answers_over_udp_until_stopped():
    server = NameServer("127.0.0.1", RECORDS, port=0).start()
    port = server.bound_port
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"junk", ("127.0.0.1", port))          # dropped; the server goes on
            client.sendto(query("experts", edns=True), ("127.0.0.1", port))
            assert parse(client.recvfrom(512)[0])[2] == ["10.232.7.12", "10.232.7.13"]
        assert server.queries == ["experts"]
    finally:
        server.stop()
    assert not server._thread.is_alive()


def test_a_port_taken_is_a_clear_error_and_leaks_no_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        server = NameServer("127.0.0.1", RECORDS, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1:.*/udp"):
            server.start()
        assert server._socket is None
