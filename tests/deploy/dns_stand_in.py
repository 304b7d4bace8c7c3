"""A DNS server for the compose rehearsal, standing in for the answers compose's embedded DNS gives
to a network alias several containers share (`experts`): an A record per container.

A hosts file cannot say that for gRPC's resolver (see compose_rehearsal.py), and Prometheus's DNS
service discovery does not read hosts files at all: it sends its own queries to the servers in
/etc/resolv.conf. This answers A queries over UDP for the names it is given, NXDOMAIN for any other
name, an empty answer for other record types of a known name, and drops what it cannot parse or
what is not a standard query.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

_HEADER = struct.Struct("!6H")      # id, flags, questions, answers, authorities, additionals
_QR, _AA, _RD, _RA = 0x8000, 0x0400, 0x0100, 0x0080
_NXDOMAIN = 3
_TYPE_A, _TYPE_ANY, _CLASS_IN = 1, 255, 1
_TTL_S = 5
_OPCODE = 0x7800                    # flag bits of the opcode; 0 = a standard query

log = logging.getLogger(__name__)


def parse_question(query: bytes) -> tuple[str, int, int, int] | None:
    """(name in lower case without the final dot, type, class, end of the question) of a query with
    exactly one question; None when `query` is not one (a response, compressed, cut short)."""
    if len(query) < _HEADER.size:
        return None
    _, flags, questions, *_ = _HEADER.unpack_from(query)
    if flags & (_QR | _OPCODE) or questions != 1:
        return None
    labels, at = [], _HEADER.size
    while True:
        if at >= len(query):
            return None
        length = query[at]
        if length == 0:
            break
        if length > 63 or at + 1 + length > len(query):   # a pointer (0xC0) has no place in a question
            return None
        labels.append(query[at + 1:at + 1 + length].decode("ascii", "replace").lower())
        at += 1 + length
    if at + 5 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, at + 1)
    return ".".join(labels), qtype, qclass, at + 5


def answer(query: bytes, records: dict[str, list[str]]) -> tuple[str, bytes] | None:
    """(the name asked, the response) to `query` from `records` (name -> IPv4 addresses); None to
    drop it."""
    question = parse_question(query)
    if question is None:
        return None
    name, qtype, qclass, end = question
    query_id, flags = struct.unpack_from("!HH", query)
    addresses = records.get(name)
    rcode = 0 if addresses is not None else _NXDOMAIN
    if addresses is None or qclass != _CLASS_IN or qtype not in (_TYPE_A, _TYPE_ANY):
        addresses = []
    # Each record names the question's name by a pointer to it (offset 12, right after the header).
    rows = b"".join(struct.pack("!HHHIH", 0xC000 | _HEADER.size, _TYPE_A, _CLASS_IN, _TTL_S, 4) +
                    socket.inet_aton(address) for address in addresses)
    header = _HEADER.pack(query_id, _QR | _AA | _RA | (flags & _RD) | rcode, 1, len(addresses), 0, 0)
    return name, header + query[_HEADER.size:end] + rows


class NameServer:
    """`records` answered on UDP `address`:`port` by a daemon thread, from start() to stop()."""

    def __init__(self, address: str, records: dict[str, list[str]], port: int = 53) -> None:
        self.address, self.port = address, port
        self.records = {name.lower().rstrip("."): list(ips) for name, ips in records.items()}
        self.queries: list[str] = []    # names asked, for a test's failure message
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> NameServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.address, self.port))
        except OSError as e:
            sock.close()
            raise RuntimeError(f"the DNS stand-in cannot listen on {self.address}:{self.port}/udp: {e} "
                               f"(a DNS server of this host bound to every address?)") from None
        sock.settimeout(0.2)
        self._socket = sock
        self._thread = threading.Thread(target=self._serve, name="dns-stand-in", daemon=True)
        self._thread.start()
        return self

    @property
    def bound_port(self) -> int:
        """The UDP port it listens on (the one the system picked, for port 0)."""
        return self._socket.getsockname()[1]

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError as e:   # closed by stop(), or broken: do not spin on it
                if not self._stopping.is_set():
                    log.warning("DNS stand-in: %s", e)
                    time.sleep(0.2)
                continue
            answered = answer(query, self.records)
            if answered is None:
                continue
            name, response = answered
            self.queries.append(name)
            try:
                self._socket.sendto(response, peer)
            except OSError as e:   # one lost answer: the resolver asks again
                log.warning("DNS stand-in: answering %s: %s", peer, e)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()
