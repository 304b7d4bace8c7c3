"""The rules every chain implementation applies (commit-reveal, endpoints), in one place so that
LocalChain (which enforces them on write) and BittensorChain (which checks them before sending
and on reading) refuse the same things with the same messages."""

from __future__ import annotations

import ipaddress
import re

from subnet.chain.base import ChainError
from subnet.chain.signing import digest_of
from subnet.rounds import RoundSchedule

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
ENDPOINT_MAX_CHARS = 300
# Narrower than "printable ASCII": no '/', '@', ':' or '%' that a gRPC target or URL would read
# as something other than a host.
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
# gRPC reads "<scheme>:<rest>" as a target URI when it knows the scheme: "unix:50051" would dial a
# unix socket on the router's host, not a host named "unix".
_GRPC_SCHEMES = frozenset({"unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock", "xds", "google-c2p"})


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


def check_endpoint(endpoint: str, what: str) -> None:
    """ChainError unless `endpoint` is `host:port`: a hostname or IPv4 address, or a bracketed
    IPv6 address (`[::1]:50051`), and a port 1..65535."""
    if not isinstance(endpoint, str):
        raise ChainError(f"{what}: endpoint must be a 'host:port' string, got {type(endpoint).__name__}")
    if len(endpoint) > ENDPOINT_MAX_CHARS:
        raise ChainError(f"{what}: endpoint is {len(endpoint)} characters long, at most {ENDPOINT_MAX_CHARS} "
                         f"allowed: {endpoint[:40]!r}...")
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
            valid_host = True
        except ValueError:
            valid_host = False
    else:
        valid_host = bool(_HOSTNAME.fullmatch(host)) and host.lower() not in _GRPC_SCHEMES
    valid_port = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    if not (valid_host and valid_port):
        raise ChainError(f"{what}: endpoint must be 'host:port' (a hostname or IPv4 address, or [IPv6 address], "
                         f"and a port 1..65535; not a gRPC scheme such as 'unix:'), e.g. 'expert-0:50051', "
                         f"'10.0.0.1:50051' or '[::1]:50051'; got {endpoint!r}")


def is_endpoint(value) -> bool:
    """Whether `check_endpoint` takes `value`: for readers that skip what a hostile writer stored."""
    try:
        check_endpoint(value, "endpoint")
    except ChainError:
        return False
    return True


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """(host, port) of a `host:port` endpoint, an IPv6 host without its brackets."""
    host, _, port = endpoint.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), port


def same_endpoint(a: str, b: str) -> bool:
    """Whether two `host:port` endpoints name the same place: IP addresses compared as addresses
    (Bittensor reads `[2001:DB8:0::1]` back as `[2001:db8::1]`, an IPv4-mapped address in another
    spelling still), hostnames without regard to case."""
    if a == b:
        return True
    (host_a, port_a), (host_b, port_b) = split_endpoint(a), split_endpoint(b)
    if port_a != port_b:
        return False
    try:
        return ipaddress.ip_address(host_a) == ipaddress.ip_address(host_b)
    except ValueError:
        return host_a.lower() == host_b.lower()


def _check_round(round: int, what: str) -> None:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ChainError(f"{what}: round must be an integer >= 0, got {round!r}")


def axon_address(endpoint: str, what: str) -> tuple[str, int]:
    """(ip, port) of a checked endpoint as Bittensor's serve_axon stores it: an IP address that peers
    can reach. ChainError for a hostname or a bind address (0.0.0.0, ::), saying what to set."""
    check_endpoint(endpoint, what)
    host, port = split_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ChainError(f"{what}: {host!r} is a hostname, but Bittensor's serve_axon stores an IP address: "
                         f"advertise the service's public IP (EXPERT_ADVERTISE_ENDPOINT=<ip>:<port>)") from None
    if ip.is_unspecified:   # the chain stores "no axon" as IP 0: it would read back as serving nothing
        raise ChainError(f"{what}: {ip} is a bind address, not one peers can reach: advertise the service's "
                         f"public IP (EXPERT_ADVERTISE_ENDPOINT=<ip>:<port>)")
    return str(ip), int(port)
