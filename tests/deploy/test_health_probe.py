"""subnet.health_probe against a real gRPC health service on loopback."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from subnet import health_probe
from subnet.processes import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
pytestmark = pytest.mark.integration  # a real gRPC server on loopback


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_serving_is_exit_0_and_anything_else_is_1(health_server, capsys):
    address, servicer = health_server
    servicer.set("", SERVING)
    servicer.set("moe.v1.Expert", NOT_SERVING)
    assert health_probe.main([address]) == 0
    assert health_probe.main([address, "--service", "moe.v1.Expert"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert health_probe.main([address, "--service", "moe.v1.Nothing"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    servicer.set("moe.v1.Expert", SERVING)
    assert health_probe.main([address, "--service", "moe.v1.Expert"]) == 0


def test_nothing_listening_fails_fast_and_any_serving_address_is_enough(health_server, capsys):
    address, servicer = health_server
    servicer.set("", SERVING)
    closed = f"127.0.0.1:{free_port()}"
    assert health_probe.main([closed, "--timeout-s", "1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert health_probe.main([closed, address, "--timeout-s", "1"]) == 0


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        health_probe.main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        health_probe.main(["127.0.0.1:1", "--timeout-s", "0"])
    assert info.value.code == 2
