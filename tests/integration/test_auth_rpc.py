"""Signed requests against real servers: an expert service subprocess (nonces in the real Redis)
and an in-process router. Every failed check answers its own code and a message naming the
check; Health and Info stay open; the server keeps serving; rejections are counted."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moe import MoELM, preset
from moe.experts import SwiGLU
from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer, StartupError
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer, router_auth
from services.router.servicer import RouterServicer
from subnet.auth import AuthConfig, SigningChannel, sign_metadata
from subnet.auth.client import answer_signature
from subnet.auth.nonces import REDIS_PREFIX
from subnet.envconfig import from_env
from subnet.identity import Identity, WalletConfig
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration
DIM, INTER = 16, 32
FORWARD = "/moe.v1.Expert/Forward"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def service(expert_service_module_factory, redis_server):
    return expert_service_module_factory(["0.0"], DIM, INTER, env={"REDIS_URL": "", "AUTH_REDIS_URL": redis_server.url,
                                                                   "EXPERT_BATCH_WAIT_MS": "0"})


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.endpoint) as ch:
        yield ch


def forward_body(n: int = 2) -> bytes:
    return expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(torch.ones(n, DIM))).SerializeToString()


def send(channel, body: bytes, metadata=(), method: str = FORWARD):
    """The raw call: these bytes, this metadata. Returns the response or the RpcError."""
    call = channel.unary_unary(method, request_serializer=None,
                               response_deserializer=expert_pb2.ForwardResponse.FromString)
    try:
        return call(body, timeout=30, metadata=metadata)
    except grpc.RpcError as e:
        return e


def rejections(service) -> dict[str, float]:
    text = urllib.request.urlopen(service.metrics_url, timeout=5).read().decode()
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "expert_auth_rejections_total"}


def test_valid_signed_request_works(channel, service, client_identity):
    body = forward_body()
    reply = send(channel, body, sign_metadata(client_identity, FORWARD, body, service.hotkey))
    assert decode(reply.outputs).shape == (2, DIM)


@pytest.mark.parametrize("case,code,fragment", [
    ("missing metadata", Code.UNAUTHENTICATED, "not signed"),
    ("forged signature", Code.UNAUTHENTICATED, "bad signature"),
    ("stale timestamp", Code.UNAUTHENTICATED, "stale timestamp"),
    ("signed for another receiver", Code.UNAUTHENTICATED, "bad signature"),
    ("unallowed hotkey", Code.PERMISSION_DENIED, "is not in AUTH_ALLOWLIST"),
])
def test_each_failed_check_has_its_code_and_message(channel, service, client_identity, dev_wallets,
                                                    case, code, fragment):
    body = forward_body()
    stranger = Identity.generate()
    metadata = {
        "missing metadata": (),
        # The client's hotkey, nonce and timestamp, but someone else's signature.
        "forged signature": sign_metadata(client_identity, FORWARD, body, service.hotkey)[:3]
        + sign_metadata(stranger, FORWARD, body, service.hotkey)[3:],
        "stale timestamp": sign_metadata(client_identity, FORWARD, body, service.hotkey,
                                         now_ms=int((time.time() - 60) * 1000)),
        "signed for another receiver": sign_metadata(client_identity, FORWARD, body,
                                                     dev_wallets.router_identity.hotkey),
        "unallowed hotkey": sign_metadata(stranger, FORWARD, body, service.hotkey),
    }[case]
    before = rejections(service)
    error = send(channel, body, metadata)
    assert isinstance(error, grpc.RpcError) and error.code() == code, error
    assert fragment in error.details()
    if case == "unallowed hotkey":
        assert stranger.hotkey in error.details()
    after = rejections(service)
    assert sum(after.values()) == sum(before.values()) + 1
    # ... and the server keeps serving.
    test_valid_signed_request_works(channel, service, client_identity)


def test_replayed_nonce_is_refused_through_redis(channel, service, client_identity, redis_client):
    body = forward_body()
    metadata = sign_metadata(client_identity, FORWARD, body, service.hotkey)
    assert not isinstance(send(channel, body, metadata), grpc.RpcError)
    nonce = dict(metadata)["x-moe-nonce"]
    key = f"{REDIS_PREFIX}{client_identity.hotkey}:{nonce}"
    assert redis_client.exists(key) and 0 < redis_client.pttl(key) <= 20_000   # 2 x AUTH_WINDOW_S
    error = send(channel, body, metadata)
    assert error.code() == Code.UNAUTHENTICATED and "replayed nonce" in error.details()
    assert rejections(service)["replayed_nonce"] >= 1


def test_health_and_info_are_open(channel, service):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="moe.v1.Expert"),
                                                       timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    info = expert_pb2_grpc.ExpertStub(channel).Info(expert_pb2.InfoRequest(), timeout=5)   # unsigned
    assert [e.uid for e in info.experts] == ["0.0"]


def test_every_expert_rpc_is_protected(channel, service, client_identity):
    stub = expert_pb2_grpc.ExpertStub(channel)   # unsigned
    for rpc, request in (("Backward", expert_pb2.BackwardRequest(expert_uid="0.0")),
                         ("GradNorm", expert_pb2.GradNormRequest(expert_uid="0.0")),
                         ("ApplyStep", expert_pb2.ApplyStepRequest(expert_uid="0.0"))):
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, rpc)(request, timeout=10)
        assert info.value.code() == Code.UNAUTHENTICATED, rpc
    signed = expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, service.hotkey))
    assert signed.GradNorm(expert_pb2.GradNormRequest(expert_uid="0.0", step=0), timeout=10).backward_calls == 0


def test_answers_to_signed_calls_carry_the_services_signature_of_them(channel, service, client_identity):
    """Over gRPC, a protected method's answer and an open one's (Info) carry the service's signature in the
    trailing metadata, bound to the request's nonce and bytes; an unsigned request to Info gets none."""
    signer = SigningChannel(channel, client_identity, service.hotkey)
    raw = channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)
    for method, body in ((FORWARD, forward_body()), ("/moe.v1.Expert/Info", b"")):
        body, metadata, check = signer.sign_call(method, body, None, ())
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        answer, call = raw.with_call(body, metadata=metadata, timeout=10)
        signature = answer_signature(call.trailing_metadata())
        assert signature is not None and check.problem(answer, signature) is None, method
        assert check.problem(answer + b"\0", signature) is not None
    _, call = raw.with_call(b"", timeout=10)   # Info, unsigned: nothing to sign for
    assert answer_signature(call.trailing_metadata()) is None


# ---- start-up (in process: the checks run before any port is bound) ----------------------------


def _config(**env) -> ExpertConfig:
    return from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": str(DIM), "EXPERT_INTER_DIM": str(INTER),
                                   "EXPERT_PORT": "0", "EXPERT_THREADS": "1", **env})


def test_startup_needs_a_wallet_and_someone_to_accept(tmp_path, client_identity):
    missing = _config(WALLET_PATH=str(tmp_path), WALLET_NAME="nobody",
                      AUTH_ALLOWLIST=client_identity.hotkey)
    with pytest.raises(StartupError) as info:
        asyncio.run(ExpertServer(missing).start())
    assert str(tmp_path / "nobody" / "hotkeys" / "default") in str(info.value) and "dev-wallet" in str(info.value)

    nobody_allowed = _config()
    with pytest.raises(StartupError, match="AUTH_MODE=on needs AUTH_ALLOWLIST"):
        asyncio.run(ExpertServer(nobody_allowed, identity=Identity.generate()).start())


def test_auth_off_warns_and_serves_unsigned_requests(tmp_path, caplog):
    config = _config(AUTH_MODE="off")

    async def scenario():
        server = ExpertServer(config, experts={"0.0": SwiGLU(DIM, INTER)})
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.endpoint) as ch:
                return await expert_pb2_grpc.ExpertStub(ch).Forward(
                    expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(torch.ones(1, DIM))), timeout=10)
        finally:
            await server.stop(grace_s=0)

    with caplog.at_level(logging.WARNING):
        reply = asyncio.run(scenario())
    assert decode(reply.outputs).shape == (1, DIM)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("AUTH_MODE=off" in m and "does not authenticate requests" in m for m in warnings)


# ---- the router's own RPCs ---------------------------------------------------------------------


class _NoRegistry:
    def all_replicas(self):
        return {}


class _Tokenizer:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def router_model():
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=64, block_size=16))


def _router(model, identity: Identity, allowed: str, open_generate: bool = False):
    config = RouterConfig(open_generate=open_generate, wallet=WalletConfig(),
                          auth=AuthConfig(allowlist=(allowed,)))
    metrics = RouterMetrics()
    servicer = RouterServicer(model, _Tokenizer(), ReplicaSet(_NoRegistry()), metrics, max_new_tokens=4)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4, auth=router_auth(config, identity, metrics))
    return server.start(), metrics


def test_router_protects_logits_and_generate(router_model, client_identity):
    router_identity = Identity.generate()
    server, metrics = _router(router_model, router_identity, allowed=client_identity.hotkey)
    try:
        with grpc.insecure_channel(server.endpoint) as ch:
            signed = router_pb2_grpc.RouterStub(SigningChannel(ch, client_identity, router_identity.hotkey))
            stranger = router_pb2_grpc.RouterStub(SigningChannel(ch, Identity.generate(), router_identity.hotkey))
            unsigned = router_pb2_grpc.RouterStub(ch)
            logits = signed.Logits(router_pb2.LogitsRequest(tokens=[1, 2, 3]), timeout=30)
            assert decode(logits.logits).shape == (3, 64)
            streamed = list(signed.Generate(router_pb2.GenerateRequest(prompt_tokens=[1, 2], max_new_tokens=2),
                                            timeout=30))
            assert len(streamed) == 2
            assert unsigned.Info(router_pb2.RouterInfoRequest(), timeout=10).vocab_size == 64
            for stub, code, fragment in ((unsigned, Code.UNAUTHENTICATED, "not signed"),
                                         (stranger, Code.PERMISSION_DENIED, "is not in AUTH_ALLOWLIST")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Logits(router_pb2.LogitsRequest(tokens=[1]), timeout=10)
                assert info.value.code() == code and fragment in info.value.details()
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Generate(router_pb2.GenerateRequest(prompt_tokens=[1], max_new_tokens=1), timeout=10))
                assert info.value.code() == code
        counted = {s.labels["reason"]: s.value for m in metrics.auth_rejections.collect() for s in m.samples
                   if s.name.endswith("_total")}
        assert counted == {"missing_metadata": 2.0, "not_allowed": 2.0}
    finally:
        server.stop(grace_s=0)


def test_router_open_generate_lets_anyone_generate_but_not_read_logits(router_model, client_identity):
    router_identity = Identity.generate()
    server, _ = _router(router_model, router_identity, allowed=client_identity.hotkey, open_generate=True)
    try:
        with grpc.insecure_channel(server.endpoint) as ch:
            unsigned = router_pb2_grpc.RouterStub(ch)
            assert len(list(unsigned.Generate(router_pb2.GenerateRequest(prompt_tokens=[1], max_new_tokens=1),
                                              timeout=30))) == 1
            with pytest.raises(grpc.RpcError) as info:
                unsigned.Logits(router_pb2.LogitsRequest(tokens=[1]), timeout=10)
            assert info.value.code() == Code.UNAUTHENTICATED
    finally:
        server.stop(grace_s=0)


# ---- AUTH_CHAIN against the local chain (Redis) -------------------------------------------------


def test_auth_chain_accepts_validators_of_the_metagraph(redis_server):
    """The expert reads the chain's metagraph once at start (and then every AUTH_CHAIN_REFRESH_S),
    never per request: a validator (stake, so a permit) is served; a registered miner without a
    permit and an unregistered hotkey are refused with the reason."""
    import redis

    from subnet.chain.local import LocalChain
    from subnet.rounds import RoundConfig

    prefix = f"moe:chain:auth-test-{time.monotonic_ns()}:"
    chain_env = {"CHAIN": "local", "CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix}
    validator, miner, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    client = redis.Redis.from_url(redis_server.url)
    chain = LocalChain(client, from_env(RoundConfig, {}).schedule(), key_prefix=prefix)
    chain.register(validator.hotkey, stake=10.0)
    chain.register(miner.hotkey)
    config = _config(AUTH_CHAIN="1", **chain_env)   # the service's own CHAIN_* variables
    identity = Identity.generate()

    async def scenario():
        server = ExpertServer(config, experts={"0.0": SwiGLU(DIM, INTER)}, identity=identity)
        await server.start()
        results = {}
        try:
            async with grpc.aio.insecure_channel(server.endpoint) as ch:
                for name, caller in (("validator", validator), ("miner", miner), ("stranger", stranger)):
                    stub = expert_pb2_grpc.ExpertStub(SigningChannel(ch, caller, identity.hotkey))
                    try:
                        await stub.GradNorm(expert_pb2.GradNormRequest(expert_uid="0.0"), timeout=10)
                        results[name] = "ok"
                    except grpc.aio.AioRpcError as e:
                        results[name] = (e.code(), e.details())
        finally:
            await server.stop(grace_s=0)
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        client.close()
    assert results["validator"] == "ok"
    assert results["miner"] == (Code.PERMISSION_DENIED, f"hotkey {miner.hotkey} has no validator permit")
    assert results["stranger"] == (Code.PERMISSION_DENIED, f"hotkey {stranger.hotkey} is not registered on the subnet")
