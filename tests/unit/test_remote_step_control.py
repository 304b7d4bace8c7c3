"""services.router.expert_calls without sockets: the gradients' wire dtype, GradNorm answers
that cannot be a squared norm, and which refused Backwards are resent with their inputs."""

import grpc
import pytest
import torch

from services.router.expert_calls import BackwardCall, ForwardCall, GradNormCall, grad_wire_dtype
from subnet.tensor_codec import RESEND_INPUTS_HINT, WIRE_DTYPES, TensorError
from subnet.wire.v1 import expert_pb2


def test_gradients_never_travel_in_fp16():
    assert grad_wire_dtype("fp16") == "bf16"          # fp16 underflows below 6e-8, where gradients live
    assert grad_wire_dtype("fp32") == "fp32"          # exact stays exact
    assert grad_wire_dtype("bf16") == "bf16"
    assert grad_wire_dtype("int8") == "int8"          # fp32 block scales: fp32's range
    assert all(grad_wire_dtype(d) != "fp16" for d in WIRE_DTYPES)


def test_a_negative_squared_norm_is_a_bad_answer_and_a_non_finite_one_is_not_usable():
    call = GradNormCall("0.0", "127.0.0.1:1", step=0, session_id="s")
    with pytest.raises(TensorError) as info:
        call.accept(expert_pb2.GradNormResponse(sq_norm=-1.0, backward_calls=1))
    assert info.value.code == grpc.StatusCode.INTERNAL and "negative" in info.value.message
    # Overflow: left out of the norm, and that replica skips its step (RemoteExpertGroup._end_step),
    # so one miner's Inf does not skip everyone's step.
    for bad in (float("inf"), float("nan")):
        call = GradNormCall("0.0", "127.0.0.1:1", step=0, session_id="s")
        call.accept(expert_pb2.GradNormResponse(sq_norm=bad, backward_calls=1))
        assert not call.usable and call.sq_norm == 0.0
    call = GradNormCall("0.0", "127.0.0.1:1", step=0, session_id="s")
    call.accept(expert_pb2.GradNormResponse(sq_norm=2.5, backward_calls=1))
    assert call.usable and call.sq_norm == 2.5


def _backward_call():
    forward = ForwardCall("0.0", torch.zeros(2, 4), "fp32", dim=4, call_id="c", step=0, training=True, retries=0)
    forward.endpoint = "127.0.0.1:1"
    return BackwardCall(forward, torch.zeros(2, 4), "fp32", session_id="s")


def test_a_backward_is_resent_with_its_inputs_only_when_the_expert_lost_the_activations():
    lost = f"expert 0.0 no longer holds the activations of call_id 'c' (expired or evicted); {RESEND_INPUTS_HINT}"
    call = _backward_call()
    assert call.again(grpc.StatusCode.FAILED_PRECONDITION, lost) and call.with_inputs
    assert not call.again(grpc.StatusCode.FAILED_PRECONDITION, lost)   # once: with the inputs it cannot be lost
    # A step conflict or overflowing gradients would be refused the same way again: not resent.
    for refusal in ("step 3 of this session was already applied (or skipped) on expert 0.0",
                    "the gradients of this Backward on expert 0.0 are not finite (NaN or Inf); nothing was applied"):
        call = _backward_call()
        assert not call.again(grpc.StatusCode.FAILED_PRECONDITION, refusal) and not call.with_inputs
