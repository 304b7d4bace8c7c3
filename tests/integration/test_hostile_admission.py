"""Admission control beyond Forward, against a real expert service: while the one compute thread
is busy, Backward (with recompute), GradNorm and ApplyStep calls past EXPERT_MAX_PENDING_TASKS are
refused at once with RESOURCE_EXHAUSTED, instead of queueing without bound; the admitted ones and
later calls are served."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from subnet.auth import SigningChannel
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc

pytestmark = pytest.mark.integration
DIM, INTER = 512, 2048          # a 4096-token Forward holds the compute thread for about a second
LIMIT = 2
Code = grpc.StatusCode


def test_backward_gradnorm_applystep_past_the_limit_are_refused(expert_service_factory, client_identity):
    service = expert_service_factory(["0.0"], DIM, INTER, env={
        "REDIS_URL": "", "EXPERT_BATCH_WAIT_MS": "0", "EXPERT_MAX_PENDING_TASKS": str(LIMIT)})
    gen = torch.Generator().manual_seed(0)
    big = encode(torch.randn(4096, DIM, generator=gen))
    small, grad = encode(torch.randn(4, DIM, generator=gen)), encode(torch.randn(4, DIM, generator=gen))

    async def scenario():
        async with grpc.aio.insecure_channel(service.endpoint, options=[
                ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = expert_pb2_grpc.ExpertStub(SigningChannel(ch, client_identity, service.hotkey))
            await stub.Info(expert_pb2.InfoRequest(), timeout=10)          # connected
            busy = asyncio.ensure_future(stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=big),
                                                      timeout=60))
            await asyncio.sleep(0.3)                                        # computing now
            calls = [stub.Backward(expert_pb2.BackwardRequest(expert_uid="0.0", call_id=f"flood-{i}", step=0,
                                                              grad_outputs=grad, inputs=small), timeout=60)
                     for i in range(3)]
            calls += [stub.GradNorm(expert_pb2.GradNormRequest(expert_uid="0.0", step=0), timeout=60)
                      for _ in range(3)]
            calls.append(stub.ApplyStep(expert_pb2.ApplyStepRequest(expert_uid="0.0", step=0, skip=True), timeout=60))
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert decode((await busy).outputs).shape == (4096, DIM)
            # Once the thread is free, everything is admitted again.
            after = await stub.GradNorm(expert_pb2.GradNormRequest(expert_uid="0.0", step=0), timeout=60)
            return results, after

    results, after = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert all(r.code() == Code.RESOURCE_EXHAUSTED for r in refused), [(r.code(), r.details()) for r in refused]
    assert refused, "no call was refused: Backward/GradNorm/ApplyStep still queue without bound"
    assert all(f"(limit {LIMIT})" in r.details() and len(r.details()) < 1024 for r in refused)
    assert len(results) - len(refused) >= LIMIT                         # the admitted ones were served
    assert isinstance(after, expert_pb2.GradNormResponse)
    log = service.log()
    assert "Traceback" not in log, log[-3000:]
