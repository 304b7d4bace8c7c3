"""The expert service: wires config, weights, backend, batcher, servicer, health, metrics
and the registry heartbeat together, and owns their lifecycle.

    EXPERT_UIDS=0.0,0.1 EXPERT_DIM=64 EXPERT_INTER_DIM=128 python -m services.expert

In a test, in-process:

    server = ExpertServer(config)
    await server.start(); await server.wait_ready()
    ...  # dial server.endpoint
    await server.stop()

Start-up order: load the wallet's hotkey (AUTH_MODE=on), bind ports (fail fast when taken),
start gRPC with health NOT_SERVING (Expert RPCs answer UNAVAILABLE), load weights, register
in Redis, then SERVING. With AUTH_MODE=on every RPC but Info (and Health) must be signed
for this service's hotkey by an allowed caller (`subnet.auth`), checked before the servicer runs.
With S3_ENDPOINT set it also takes part in the rounds (services/expert/rounds.py): it may start
from S3, publishes a signed checkpoint each round and commits it on the chain.
Stop order: deregister, NOT_SERVING, drain in-flight RPCs for `grace_s`, publish once more
(with S3), stop compute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

import grpc
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from moe.experts import SwiGLU
from services.expert.adversary import liar_answer
from services.expert.backend import ExpertBackend
from services.expert.batcher import Batcher, ComputeWorker
from services.expert.chain_listing import ChainListing
from services.expert.config import ExpertConfig
from services.expert.metrics import ExpertMetrics
from services.expert.rounds import ExpertRounds
from services.expert.servicer import ExpertServicer
from subnet.auth import ServerAuth, build_server_auth, service_identity
from subnet.auth.sessions import SESSION_METHOD
from subnet.chain.base import Chain, ChainError
from subnet.chain.config import open_chain, signing_wallet
from subnet.chain.rules import axon_address, check_endpoint, split_endpoint
from subnet.checkpoints import CheckpointVerificationError
from subnet.decode_guard import DecodeGuard
from subnet.envconfig import ConfigError
from subnet.expert_weights import CheckpointError, experts_from_checkpoint, init_expert, save_expert_weights
from subnet.fd_limits import connection_limit
from subnet.frames.protocol import EXPERT_RPCS
from subnet.frames.server import FramesServer
from subnet.identity import Identity, IdentityError
from subnet.object_store import StoreError
from subnet.processes import port_in_use
from subnet.registry import ExpertRegistry, Heartbeat, HeartbeatEntry
from subnet.shm import ShmAttachments, host_id
from subnet.spliced_wire import add_spliced_servicer
from subnet.telemetry import AioServerTracing
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name  # "moe.v1.Expert"
BIND_ALL = ("0.0.0.0", "::", "")   # EXPERT_HOST values that listen everywhere: the endpoint names this host instead
OPEN_METHODS = frozenset({f"/{SERVICE_NAME}/Info"})  # probes and routers read Info unsigned
# The calls that carry tensors, also served over moe-frames/1 (subnet/frames) when EXPERT_FRAMES_PORT >= 0.
FRAMES_METHODS = tuple(f"/{SERVICE_NAME}/{name}" for name in EXPERT_RPCS)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(RuntimeError):
    """The service cannot start (port taken, bad checkpoint, device missing); one-line message."""


class _Deferred(expert_pb2_grpc.ExpertServicer):
    """Stands in for the ExpertServicer until the weights are loaded: answers UNAVAILABLE."""

    def __init__(self) -> None:
        self.target: ExpertServicer | None = None

    async def _call(self, name: str, request, context):
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the expert service is still loading its weights")
        return await getattr(self.target, name)(request, context)

    async def Forward(self, request, context):
        return await self._call("Forward", request, context)

    async def ForwardMany(self, request, context):
        return await self._call("ForwardMany", request, context)

    async def Backward(self, request, context):
        return await self._call("Backward", request, context)

    async def GradNorm(self, request, context):
        return await self._call("GradNorm", request, context)

    async def ApplyStep(self, request, context):
        return await self._call("ApplyStep", request, context)

    async def Info(self, request, context):
        return await self._call("Info", request, context)


class ExpertServer:
    """One expert service. `experts` overrides the weights (tests); else checkpoint or seed.
    `identity` overrides the wallet (tests); else WALLET_* when AUTH_MODE=on."""

    def __init__(self, config: ExpertConfig, experts: Mapping[str, SwiGLU] | None = None,
                 identity: Identity | None = None):
        self.config = config
        self._given_experts = experts
        self.identity = identity
        self.auth: ServerAuth | None = None
        self.chain: Chain | None = None
        self.rounds: ExpertRounds | None = None
        self.listing: ChainListing | None = None   # EXPERT_SERVE_ON_CHAIN
        self._listing_task: asyncio.Task | None = None
        self.port: int | None = None
        self.frames: FramesServer | None = None
        self.frames_port: int | None = None   # moe-frames/1 (subnet/frames), when on
        self.metrics_port: int | None = None
        self.metrics = ExpertMetrics()
        self.health = health_aio.HealthServicer()
        self.backend: ExpertBackend | None = None
        self.batcher: Batcher | None = None
        self.worker: ComputeWorker | None = None
        self.heartbeat: Heartbeat | None = None
        self._redis: redis.Redis | None = None
        self._grpc: grpc.aio.Server | None = None
        self._deferred = _Deferred()
        self._janitor: asyncio.Task | None = None
        self.shm: ShmAttachments | None = None   # routers on this host send tensors through it
        self._ready = asyncio.Event()

    @property
    def endpoint(self) -> str:
        """The `host:port` routers dial (and the registry and the chain list)."""
        return self._endpoint_at(self.port)

    def _endpoint_at(self, port: int) -> str:
        c = self.config
        if c.advertise_endpoint:
            return c.advertise_endpoint
        host = c.host
        if host in BIND_ALL:
            host = socket.gethostbyname(socket.gethostname())   # a pod's own IP in Kubernetes
        if ":" in host:   # an IPv6 address: "::1:50051" would not parse as host and port
            host = f"[{host}]"
        return f"{host}:{port}"

    async def start(self) -> None:
        """Bind, serve health (NOT_SERVING), load weights, then SERVING and register."""
        c = self.config
        self._authenticate()
        if c.threads > 0:
            torch.set_num_threads(c.threads)
        if c.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
            except OSError as e:
                raise StartupError(f"metrics port {c.metrics_port} on {c.host} is not available "
                                   f"({e.strerror}); set EXPERT_METRICS_PORT to a free port or 0") from None
        # Tracing outermost: a request the auth check rejects still gets its (ERROR) span.
        interceptors = [AioServerTracing(), DecodeGuard()] + ([self.auth.aio_interceptor()] if self.auth else [])
        self._grpc = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ])
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        # Tensors in and out without protobuf's copies; the wire stays moe.v1 (subnet/spliced_wire.py).
        handlers = add_spliced_servicer(expert_pb2_grpc.add_ExpertServicer_to_server, self._deferred, self._grpc)
        self.port = self._bind(c.host, c.port)
        await self._grpc.start()
        if c.frames_port >= 0:   # the tensor calls again, on a raw TCP port, behind the same interceptors
            frames_handlers = {path: handlers[path] for path in FRAMES_METHODS}
            if self.auth is not None:   # a signed key exchange per connection, then a MAC per call
                frames_handlers[SESSION_METHOD] = self.auth.session_handler(self.metrics.frames_sessions.inc)
            self.frames = FramesServer(frames_handlers, interceptors, c.max_message_bytes,
                                       max_connections=connection_limit(),   # a quarter of the descriptors at most
                                       on_connections=self.metrics.frames_connections.set,
                                       on_refused=lambda reason: self.metrics.frames_refused.labels(reason).inc())
            try:
                self.frames_port = await self.frames.start(c.host, c.frames_port)
            except OSError as e:
                raise StartupError(f"cannot listen for moe-frames on {c.host}:{c.frames_port} ({e.strerror}); "
                                   f"set EXPERT_FRAMES_PORT to a free port, 0 (any) or -1 (off)") from None

        self.worker = ComputeWorker(c.threads, c.max_pending_tasks)
        experts = await self.worker.run(self._load_experts)
        self.backend = ExpertBackend(experts, c.device, c.activation_ttl_s, c.activation_cache_mb,
                                     lazy=c.adversary == "lazy", answer=liar_answer if c.adversary == "liar" else None,
                                     max_staleness=c.max_staleness,
                                     on_stale=lambda uid: self.metrics.stale_updates.labels(expert=uid).inc())
        if c.adversary:
            log.warning("EXPERT_ADVERSARY=%s: this service plays a cheating miner (tests and demo only)", c.adversary)
        if self.rounds is not None and self.rounds.initial_moments:
            self._restore_moments(self.rounds.initial_moments)
        self.batcher = Batcher(self.backend, self.worker, c.max_batch_tokens, c.batch_wait_ms,
                               c.max_queue_tokens, self.metrics)
        await self.batcher.start()
        self.shm = ShmAttachments(c.shm) if c.shm.enabled and host_id(c.shm.directory) else None
        self._deferred.target = ExpertServicer(
            self.backend, self.batcher, self.worker, allowed_dtypes=c.allowed_dtypes,
            max_request_tokens=c.max_request_tokens, max_message_bytes=c.max_message_bytes,
            device=str(self.backend.device), metrics=self.metrics, inject_delay_ms=c.inject_delay_ms,
            shm=self.shm, frames_port=self.frames_port or 0)
        self._janitor = asyncio.create_task(self._sweep_forever(), name="activation-janitor")
        if c.redis_url:  # before SERVING, so that "SERVING" also means "routers can find it"
            await self._register()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING)
        if self.rounds is not None:
            self._start_rounds()
        if c.serve_on_chain:   # after SERVING: a router that finds the endpoint can use it at once
            self.listing = ChainListing(self._chain(), self.identity, self.endpoint, check_s=c.listing_check_s,
                                        on_listed=lambda listed: self.metrics.chain_listed.set(int(listed)),
                                        on_published=self.metrics.chain_listings_published.inc)
            self._listing_task = asyncio.create_task(self.listing.run(), name="chain-listing")
        self._ready.set()
        log.info("expert service ready on %s: experts %s, dim %d, inter_dim %d, device %s, hotkey %s, "
                 "auth %s%s", self.endpoint, ",".join(c.uids), c.dim, c.inter_dim, self.backend.device,
                 self.identity.hotkey if self.identity else "-", c.auth.mode,
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "")

    def _authenticate(self) -> None:
        """Load the hotkey and build the request checks; StartupError when either cannot be had."""
        c = self.config
        try:
            self.identity = service_identity(c.auth, c.wallet, self.identity, what="expert service")
            if c.serve_on_chain:
                self._check_listing()
            if not c.auth.enabled:
                return
            if not c.auth.allowlist and not c.auth.chain:
                raise StartupError("AUTH_MODE=on needs AUTH_ALLOWLIST (the routers' hotkeys) or AUTH_CHAIN=1 "
                                   "(validators on the chain); otherwise no caller is allowed")
            self.auth = build_server_auth(
                c.auth, self.identity, open_methods=OPEN_METHODS, validator_permit=True,
                on_reject=lambda reason: self.metrics.auth_rejections.labels(reason=reason).inc(),
                chain=self._chain() if c.auth.chain else None)
        except (IdentityError, ConfigError, ChainError) as e:
            raise StartupError(str(e)) from None

    def _check_listing(self) -> None:
        """What EXPERT_SERVE_ON_CHAIN needs, found out at start (ChainError, IdentityError) rather than
        retried every 30 s for ever; opens the chain, so an unreachable one fails the start too."""
        c = self.config
        if self.identity is None:
            raise StartupError("EXPERT_SERVE_ON_CHAIN=1 needs AUTH_MODE=on: the listing is signed by the hotkey")
        # The endpoint to publish, with a stand-in port when EXPERT_PORT=0 picks one at bind.
        endpoint = self._endpoint_at(c.port or 1)
        if not c.advertise_endpoint and c.host in BIND_ALL and endpoint.startswith("127."):
            raise StartupError(f"EXPERT_SERVE_ON_CHAIN=1 with EXPERT_HOST={c.host!r}: this host's name resolves to "
                               f"{split_endpoint(endpoint)[0]}, which other hosts cannot dial; set "
                               f"EXPERT_ADVERTISE_ENDPOINT to the address routers should dial (`<ip>:<port>`)")
        what = "EXPERT_ADVERTISE_ENDPOINT" if c.advertise_endpoint else "the endpoint from EXPERT_HOST and EXPERT_PORT"
        if c.chain.chain == "bittensor":
            axon_address(endpoint, what)   # an IP address peers can reach
        else:
            check_endpoint(endpoint, what)
            if split_endpoint(endpoint)[0] in BIND_ALL:
                raise StartupError(f"{what}={endpoint!r} is a bind address, not one routers can dial: set "
                                   f"EXPERT_ADVERTISE_ENDPOINT to this service's address")
        self._chain()

    def _chain(self) -> Chain:
        if self.chain is None:
            # Rounds commit and reveal through it: on Bittensor those are extrinsics the hotkey signs.
            self.chain = open_chain(self.config.chain, self.config.rounds.schedule(),
                                    wallet=signing_wallet(self.config.chain, self.config.wallet))
        return self.chain

    def _snapshot(self) -> dict:
        """{uid: state dict copy}; runs on the compute worker, so never mid-step."""
        return {uid: {name: t.detach().to("cpu", copy=True)
                      for name, t in self.backend.module(uid).state_dict().items()}
                for uid in self.backend.uids}

    def _restore_moments(self, moments: dict) -> None:
        refused = self.backend.restore_moments(moments)
        for uid, why in refused.items():
            log.warning("expert %s starts Adam over: its saved moments were not restored: %s", uid, why)
        restored = sorted(set(moments) - set(refused))
        if restored:
            log.info("restored the AdamW moments of %d experts (%s) from the recovery checkpoint",
                     len(restored), ", ".join(restored))

    def _recovery_snapshot(self) -> tuple[dict, dict]:
        """The weights and their AdamW moments, in one turn of the compute worker (no step between)."""
        return self._snapshot(), self.backend.moments()

    def _start_rounds(self) -> None:
        loop = asyncio.get_running_loop()

        def on_worker(fn, *args):  # from the participant's thread: hop onto the compute worker
            return asyncio.run_coroutine_threadsafe(self.worker.run(fn, *args), loop).result(120)

        self.rounds.start(lambda: on_worker(self._snapshot),
                          lambda states: on_worker(self.backend.replace_weights, states),
                          self.endpoint, self.backend.keep_committed,
                          recovery_snapshot=lambda: on_worker(self._recovery_snapshot))

    def _bind(self, host: str, port: int) -> int:
        if port and port_in_use(port, host):
            raise StartupError(f"port {port} on {host} is in use; set EXPERT_PORT to a free port "
                               f"(or 0 for any free port)")
        try:
            bound = self._grpc.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e}") from None
        if bound == 0:  # older grpcio reports a failed bind this way
            raise StartupError(f"cannot listen on {host}:{port}; set EXPERT_PORT to a free port")
        return bound

    def _load_experts(self) -> dict[str, SwiGLU]:
        c = self.config
        if c.save_path:   # found out at SIGTERM, the trained weights would be lost
            if os.path.isdir(c.save_path) or c.save_path.endswith(os.sep):
                raise StartupError(f"EXPERT_SAVE_PATH={c.save_path!r} is a directory; give the file to write, "
                                   f"e.g. {os.path.join(c.save_path, 'experts.safetensors')}")
            folder = os.path.dirname(os.path.abspath(c.save_path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise StartupError(f"EXPERT_SAVE_PATH={c.save_path!r}: {folder} is not a writable directory; "
                                   f"create it (or mount a volume there) or leave EXPERT_SAVE_PATH empty")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise StartupError(f"EXPERT_DEVICE={c.device} but torch sees no CUDA device")
        if self._given_experts is not None:
            return dict(self._given_experts)
        if c.s3.enabled:
            try:
                self.rounds = ExpertRounds(c, self.identity, self._chain(), self.metrics)
                experts = self.rounds.initial_weights()
            except (ValueError, StoreError, ChainError, CheckpointVerificationError) as e:
                raise StartupError(f"S3 checkpoints: {e}") from None
            if experts is not None:
                return dict(experts)
        if c.checkpoint.startswith("s3://"):
            raise StartupError(f"EXPERT_CHECKPOINT={c.checkpoint} needs S3_ENDPOINT (and its keys) to be set")
        if c.checkpoint:
            try:
                experts = experts_from_checkpoint(c.checkpoint, c.uids, c.dim, c.inter_dim)
            except CheckpointError as e:
                raise StartupError(str(e)) from None
            log.info("loaded %d experts from %s", len(experts), c.checkpoint)
            return experts
        return {uid: init_expert(uid, c.dim, c.inter_dim, c.seed) for uid in c.uids}

    async def _register(self) -> None:
        c = self.config
        self._redis = redis.Redis.from_url(c.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        registry = ExpertRegistry(self._redis, ttl_s=c.registry_ttl_s)
        endpoint = self.endpoint
        entries = [HeartbeatEntry(uid, endpoint, load=lambda u=uid: self.batcher.queued_tokens(u),
                                  version=lambda u=uid: self.backend.version(u))
                   for uid in c.uids]
        # Signed with the service's hotkey when it has one: routers with AUTH_MODE=on take signed entries only.
        self.heartbeat = Heartbeat(registry, entries, hotkey=self.identity.hotkey if self.identity else "",
                                   signer=self.identity)
        await self.heartbeat.start()

    async def _sweep_forever(self) -> None:
        interval = min(self.config.activation_ttl_s / 2, 5.0)
        while True:
            await asyncio.sleep(interval)
            n = self.backend.cache.sweep()
            self.metrics.activation_cache_bytes.set(self.backend.cache.nbytes)
            if self.shm is not None:
                self.shm.maintain()   # unmap regions their routers removed; sweep dead routers' (SHM_SWEEP_INTERVAL_S)
            if n:
                log.info("expired %d unused training activations (no Backward within %.0f s)",
                         n, self.config.activation_ttl_s)

    def _save_weights(self, path: str) -> None:
        """Persist what training made of the hosted experts (after the last request finished)."""
        tmp = f"{path}.tmp"
        save_expert_weights(tmp, {uid: self.backend.module(uid) for uid in self.backend.uids})
        os.replace(tmp, path)
        log.info("saved %d experts to %s", len(self.backend.uids), path)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def wait_for_termination(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Deregister, NOT_SERVING, let in-flight RPCs finish (up to `grace_s`), release everything."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
            self.heartbeat = None
        if self._listing_task is not None:   # the listing stays on the chain: it names where we serve next time too
            self._listing_task.cancel()
            self._listing_task = None
        await self.health.enter_graceful_shutdown()
        if self.frames is not None:   # new frames are refused; calls already running finish below
            await self.frames.stop_accepting()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None
        if self.frames is not None:
            await self.frames.stop()
            self.frames = None
        if self.auth is not None:
            await self.auth.aclose()
            self.auth = None
        if self.rounds is not None and self.worker is not None:
            await self.rounds.stop()
        if self._janitor is not None:
            self._janitor.cancel()
            self._janitor = None
        if self.batcher is not None:
            await self.batcher.stop()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.shutdown)
            self.worker = None
        if self.config.save_path and self.backend is not None:
            try:
                self._save_weights(self.config.save_path)
            except Exception as e:   # a full disk: still release the rest (shm, Redis, chain, metrics)
                log.error("could not save the weights to EXPERT_SAVE_PATH=%s: %s: %s", self.config.save_path,
                          type(e).__name__, e)
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self.chain is not None:
            self.chain.close()
            self.chain = None
        self.metrics.stop()
