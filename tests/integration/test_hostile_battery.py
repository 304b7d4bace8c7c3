"""Every field of every moe.v1.Expert request at its limits and past them, against a real expert
service (auth on, requests signed): each answer is a specific status code (never UNKNOWN or
INTERNAL) with a message under 1 kB, the service keeps serving (a normal Forward equals the
reference after each test), and its log holds no traceback.

A table of named cases pins the expected code of each edge; hypothesis then throws arbitrary
bytes and arbitrary field values at every method. Expert 0.0 only ever sees requests that do
not train (its weights stay the reference's); Backward and ApplyStep go to 0.1.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe.experts import SwiGLU
from subnet.auth import sign_metadata
from subnet.expert_weights import save_expert_weights
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, tensor_pb2

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
DIM, INTER, MAX_TOKENS = 16, 32, 64
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
Code = grpc.StatusCode
REQUEST_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION,
                 Code.RESOURCE_EXHAUSTED, Code.ALREADY_EXISTS}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
F32, BF16, F16 = tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(7)
    experts = {"0.0": SwiGLU(DIM, INTER), "0.1": SwiGLU(DIM, INTER)}
    path = tmp_path_factory.mktemp("battery") / "experts.safetensors"
    save_expert_weights(path, experts)
    return experts, path


@pytest.fixture(scope="module")
def service(expert_service_module_factory, reference):
    return expert_service_module_factory(["0.0", "0.1"], DIM, INTER, env={
        "EXPERT_CHECKPOINT": str(reference[1]), "EXPERT_MAX_REQUEST_TOKENS": str(MAX_TOKENS),
        "EXPERT_MAX_MESSAGE_MB": "1", "EXPERT_BATCH_WAIT_MS": "0", "EXPERT_WIRE_DTYPES": "fp32,bf16,fp16",
        "REDIS_URL": ""})


class Caller:
    """Signed raw calls: any bytes, any method; returns (code, details, response bytes)."""

    def __init__(self, service, identity):
        self.service, self.identity = service, identity
        self.channel = grpc.insecure_channel(service.endpoint, options=[("grpc.max_send_message_length", 8 << 20)])

    def __call__(self, rpc: str, body) -> tuple[grpc.StatusCode, str, bytes | None]:
        if not isinstance(body, bytes):
            body = body.SerializeToString()
        method = f"/moe.v1.Expert/{rpc}"
        call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            reply = call(body, timeout=30, metadata=sign_metadata(self.identity, method, body, self.service.hotkey))
            return Code.OK, "", reply
        except grpc.RpcError as e:
            return e.code(), e.details() or "", None


@pytest.fixture(scope="module")
def call(service, client_identity):
    caller = Caller(service, client_identity)
    yield caller
    caller.channel.close()


@pytest.fixture(autouse=True)
def still_serving(service, call, reference):
    """After every test: a normal Forward equals the reference, and the log has no traceback."""
    yield
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(99))
    code, details, reply = call("Forward", expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x)))
    assert code == Code.OK, details
    outputs = decode(expert_pb2.ForwardResponse.FromString(reply).outputs)
    torch.testing.assert_close(outputs, reference[0]["0.0"](x).detach(), rtol=1e-5, atol=1e-5)
    log = service.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


def check(answer, expected: set[grpc.StatusCode] | grpc.StatusCode, what) -> None:
    code, details, _ = answer
    expected = {expected} if isinstance(expected, grpc.StatusCode) else expected
    assert code in expected, f"{what}: {code.name} {details[:300]!r}"
    assert len(details.encode()) < 1024, f"{what}: a {len(details.encode())}-byte message"


# ---- the table -----------------------------------------------------------------------------------

def t(shape=(2, DIM), dtype=F32, data=None, fill=0.5):
    """A tensor message; `data` defaults to `fill` in every element of `shape` as `dtype`."""
    if data is None:
        n = math.prod(shape) if all(d >= 0 for d in shape) else 0
        data = np.full(n, fill, "<f2" if dtype == F16 else "<f4").tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def fwd(uid="0.0", **kw):
    kw.setdefault("inputs", t())
    return "Forward", expert_pb2.ForwardRequest(expert_uid=uid, **kw)


def bwd(call_id="b", step=0, session_id="table", inputs=None, **kw):
    kw.setdefault("grad_outputs", t())
    return "Backward", expert_pb2.BackwardRequest(expert_uid=kw.pop("uid", "0.1"), call_id=call_id, step=step,
                                                  session_id=session_id, inputs=inputs, **kw)


def apply(step=0, session_id="table", **kw):
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, **kw}
    return "ApplyStep", expert_pb2.ApplyStepRequest(expert_uid=hyper.pop("uid", "0.1"), step=step,
                                                    session_id=session_id, **hyper)


def apply_now(**kw):
    return expert_pb2.ApplyNow(**{"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, **kw})


def norm(uid="0.1", step=0, session_id="table"):
    return "GradNorm", expert_pb2.GradNormRequest(expert_uid=uid, step=step, session_id=session_id)


OK, BAD, FULL, MISSING = Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND
STALE, DUP = Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS

STATELESS = {
    # expert_uid
    "uid empty": (fwd(""), BAD),
    "uid 100k characters": (fwd("7" * 100_000), BAD),
    "uid with a newline": (fwd("0.0\n"), BAD),
    "uid in Arabic-Indic digits": (fwd("\u0660.\u0660"), BAD),
    "uid with 8-digit layer": (fwd("12345678.0"), BAD),
    "uid well-formed, not hosted": (fwd("9999999.9999999"), MISSING),
    "uid with a leading zero": (fwd("0.00"), MISSING),
    # inputs: presence, rank, sizes
    "inputs missing": (("Forward", expert_pb2.ForwardRequest(expert_uid="0.0")), BAD),
    "shape empty": (fwd(inputs=t(shape=(), data=b"\0" * 4)), BAD),
    "zero tokens": (fwd(inputs=t(shape=(0, DIM))), BAD),
    "negative tokens": (fwd(inputs=t(shape=(-1, DIM))), BAD),
    "int64 max tokens": (fwd(inputs=t(shape=(INT64_MAX, DIM), data=b"")), FULL),
    "int64 min tokens": (fwd(inputs=t(shape=(INT64_MIN, DIM), data=b"")), BAD),
    "negative width": (fwd(inputs=t(shape=(1, -DIM), data=b"")), BAD),
    "width int64 max": (fwd(inputs=t(shape=(1, INT64_MAX), data=b"")), BAD),
    "rank 3": (fwd(inputs=t(shape=(2, DIM, 1))), BAD),
    "rank 1": (fwd(inputs=t(shape=(DIM,))), BAD),
    "rank 200k": (fwd(inputs=t(shape=(1,) * 200_000, data=b"")), BAD),
    "rank 200k of 2s (a 200k-bit product)": (fwd(inputs=t(shape=(2,) * 200_000, data=b"")), BAD),
    "huge product of sizes": (fwd(inputs=t(shape=(2**62, 2**62), data=b"")), FULL),
    "tokens past the request limit": (fwd(inputs=t(shape=(MAX_TOKENS + 1, DIM))), FULL),
    "message past the size limit": (fwd(inputs=t(shape=(MAX_TOKENS, DIM), data=b"\0" * (2 << 20))), FULL),
    # inputs: bytes and dtype
    "no data": (fwd(inputs=t(data=b"")), BAD),
    "one byte too many": (fwd(inputs=t(data=b"\0" * (2 * DIM * 4 + 1))), BAD),
    "one byte too few": (fwd(inputs=t(data=b"\0" * (2 * DIM * 4 - 1))), BAD),
    "fp32 bytes labelled fp16": (fwd(inputs=t(dtype=F16, data=b"\0" * (2 * DIM * 4))), BAD),
    "dtype unspecified": (fwd(inputs=t(dtype=0, data=b"\0" * (2 * DIM * 4))), BAD),
    "dtype -1": (fwd(inputs=t(dtype=-1, data=b"\0" * (2 * DIM * 4))), BAD),
    "dtype int32 max": (fwd(inputs=t(dtype=2**31 - 1, data=b"\0" * (2 * DIM * 4))), BAD),
    "dtype int8, not accepted here": (fwd(inputs=t(dtype=4, data=b"\0" * (2 * DIM + 4))), BAD),
    "NaN": (fwd(inputs=t(fill=math.nan)), BAD),
    "+Inf": (fwd(inputs=t(fill=math.inf)), BAD),
    "-Inf": (fwd(inputs=t(fill=-math.inf)), BAD),
    "fp32 max: outputs overflow": (fwd(inputs=t(fill=3.4e38)), BAD),
    "fp16 max: outputs overflow fp16": (fwd(inputs=t(dtype=F16, fill=65504.0)), BAD),
    "fp16 subnormals": (fwd(inputs=t(dtype=F16, fill=6e-8)), OK),
    "fp32 subnormals": (fwd(inputs=t(fill=1e-45)), OK),
    "unknown fields are ignored": (("Forward", fwd()[1].SerializeToString() + b"\xf8\x06\x01"), OK),
    # step, training, call_id
    "step -1": (fwd(step=-1), BAD),
    "step int64 min": (fwd(step=INT64_MIN), BAD),
    "step int64 max": (fwd(step=INT64_MAX), OK),
    "training without call_id": (fwd(training=True), BAD),
    "call_id 129 characters": (fwd(training=True, call_id="c" * 129), BAD),
    "call_id 1 MB": (fwd(call_id="c" * 900_000), BAD),
    "call_id with NUL": (fwd(training=True, call_id="a\0b"), BAD),
    "call_id 128 non-ASCII characters": (fwd(training=True, call_id="\u00e9" * 128), OK),
    # GradNorm
    "grad norm step -1": (norm(step=-1), BAD),
    "grad norm step int64 max": (norm(step=INT64_MAX), OK),
    "grad norm unknown expert": (norm(uid="3.3"), MISSING),
    "grad norm uid empty": (norm(uid=""), BAD),
    "grad norm session 65 characters": (norm(session_id="s" * 65), BAD),
    "grad norm session with a tab": (norm(session_id="a\tb"), BAD),
    # ApplyStep: every number NaN, Inf, negative, past its range
    **{f"apply {name}={value}": (apply(**{name: value}), BAD) for name, values in {
        "lr": (math.nan, math.inf, -math.inf, -1e-3, 1.5, 1e308),
        "grad_scale": (math.nan, math.inf, -1.0),
        "weight_decay": (math.nan, math.inf, -0.1, 1e4),
        "beta1": (math.nan, -0.1, 1.0, math.inf),
        "beta2": (math.nan, -0.1, 1.0, 2.0),
        "eps": (math.nan, 0.0, -1e-8, 1e-40, math.inf)}.items() for value in values},
    "apply step -1": (apply(step=-1), BAD),
    "apply unknown expert": (apply(uid="5.5"), MISSING),
    "apply session 65 characters": (apply(session_id="s" * 65), BAD),
    "apply a step never seen": (apply(step=123_456), OK),
    "apply int64 max step never seen": (apply(step=INT64_MAX), OK),
    "skip a step never seen, every number NaN": (apply(step=5, skip=True, lr=math.nan, eps=math.nan,
                                                       beta1=math.nan, beta2=math.nan, weight_decay=math.nan,
                                                       grad_scale=math.nan), OK),
    # Backward without state
    "backward unknown call_id, no inputs": (bwd(call_id="nobody"), STALE),
    "backward without call_id": (bwd(call_id=""), BAD),
    "backward call_id 129 characters": (bwd(call_id="c" * 129), BAD),
    "backward without grad_outputs": (("Backward", expert_pb2.BackwardRequest(expert_uid="0.1", call_id="x")), BAD),
    "backward NaN grad_outputs": (bwd(grad_outputs=t(fill=math.nan)), BAD),
    "backward grad_outputs wrong width": (bwd(grad_outputs=t(shape=(2, DIM + 1))), BAD),
    "backward inputs wrong width": (bwd(inputs=t(shape=(2, 3))), BAD),
    "backward step -1": (bwd(step=-1), BAD),
    "backward session 65 characters": (bwd(session_id="s" * 65), BAD),
    "backward session with a newline": (bwd(session_id="\n"), BAD),
    "backward unknown expert": (bwd(uid="8.8"), MISSING),
    "backward too many tokens": (bwd(grad_outputs=t(shape=(MAX_TOKENS + 1, DIM))), FULL),
    # Backward's asynchronous step: its numbers are checked like ApplyStep's, before anything runs
    **{f"backward apply_now {name}={value}": (bwd(apply_now=apply_now(**{name: value})), BAD)
       for name, values in {"lr": (math.nan, -1e-3, 1.5), "weight_decay": (math.inf, -0.1),
                            "beta1": (1.0,), "beta2": (math.nan,), "eps": (0.0, 1e-40),
                            "max_grad_norm": (math.nan, -1.0, math.inf)}.items() for value in values},
    "backward apply_now, unknown call_id, no inputs": (bwd(call_id="nobody", apply_now=apply_now()), STALE),
    # Info: nothing to get wrong but unknown fields
    "info with unknown fields": (("Info", b"\x08\x01\x12\x03abc"), OK),
}


@pytest.mark.parametrize("case", list(STATELESS))
def test_each_edge_has_its_code(call, case):
    (rpc, request), code = STATELESS[case]
    check(call(rpc, request), code, case)


def test_backward_and_apply_step_sequences(call):
    """The stateful edges, in order, in one session of their own."""
    s = "sequence"
    x2 = t(shape=(2, DIM), fill=0.25)
    steps = [
        ("recompute for a call_id never forwarded", bwd("r1", 3, s, inputs=x2), OK),
        ("the same call_id again", bwd("r1", 3, s, inputs=x2), DUP),
        ("rows of grad_outputs and inputs differ", bwd("r2", 3, s, inputs=t(shape=(3, DIM))), BAD),
        ("an older step than the one accumulating", bwd("r3", 2, s, inputs=x2), STALE),
        ("apply another step than the one held", apply(4, s), STALE),
        ("apply for another session", apply(3, "someone-else"), STALE),
        ("grad norm of the held step", norm("0.1", 3, s), OK),
        ("apply the held step", apply(3, s), OK),
        ("a late Backward for an applied step", bwd("r4", 3, s, inputs=x2), STALE),
        ("recompute at step int64 max", bwd("r5", INT64_MAX, s, inputs=x2), OK),
        ("skip step int64 max", apply(INT64_MAX, s, skip=True), OK),
        ("a late Backward for the skipped step", bwd("r6", INT64_MAX, s, inputs=x2), STALE),
        ("grad norm after the skip", norm("0.1", INT64_MAX, s), OK),
        # Asynchronous Backwards step at once and leave the synchronous bookkeeping alone.
        ("an asynchronous Backward (recompute)", bwd("a1", 0, "async", inputs=x2, apply_now=apply_now()), OK),
        ("another, at the same step", bwd("a2", 0, "async", inputs=x2, apply_now=apply_now()), OK),
        ("a synchronous one after them, in a session of its own", bwd("r7", 9, "sync", inputs=x2), OK),
        ("whose step applies as usual", apply(9, "sync"), OK),
    ]
    for what, (rpc, request), code in steps:
        check(call(rpc, request), code, what)


# ---- hypothesis ---------------------------------------------------------------------------------

RPCS = ("Forward", "ForwardMany", "Backward", "GradNorm", "ApplyStep", "Info")
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
uids = st.one_of(st.sampled_from(["0.0", "0.1", "", "7.7", "0.00", "1", "a.b", "0.0 "]), text)
int64 = st.integers(INT64_MIN, INT64_MAX)
dims = st.one_of(st.integers(-2, MAX_TOKENS + 2), st.sampled_from([DIM, DIM - 1, DIM + 1]), int64)
floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1e-45, 3.4e38, -3.4e38]))


@st.composite
def tensors(draw):
    """Mostly well-formed tensors (so the checks past the first are reached), some anything."""
    if draw(st.booleans()):
        return tensor_pb2.Tensor(dtype=draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(0, 5))),
                                 shape=draw(st.lists(dims, max_size=4)), data=draw(st.binary(max_size=600)))
    dtype = draw(st.sampled_from([F32, BF16, F16]))
    n = draw(st.integers(1, 6))
    values = np.array(draw(st.lists(floats, min_size=n * DIM, max_size=n * DIM)), dtype=np.float32)
    if dtype == F16:
        with np.errstate(over="ignore"):      # past fp16's range is Inf: the service must refuse it
            data = values.astype("<f2").tobytes()
    else:
        data = values.tobytes() if dtype == F32 else (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=[n, DIM], data=data)


@FUZZ
@given(rpc=st.sampled_from(RPCS), body=st.binary(max_size=300))
def test_any_bytes_get_a_request_code(call, rpc, body):
    check(call(rpc, body), REQUEST_CODES, f"{rpc} {body[:60]!r}")


@FUZZ
@given(uid=uids, inputs=st.one_of(st.none(), tensors()), call_id=text, step=int64, training=st.booleans())
def test_any_forward_gets_a_request_code(call, uid, inputs, call_id, step, training):
    request = expert_pb2.ForwardRequest(expert_uid=uid, inputs=inputs, call_id=call_id, step=step, training=training)
    check(call("Forward", request), REQUEST_CODES, request)


@FUZZ
@given(many=st.lists(uids, max_size=4), tokens=st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)),
                                                       max_size=5),
       inputs=st.one_of(st.none(), tensors()), step=int64)
def test_any_forward_many_gets_a_request_code(call, many, tokens, inputs, step):
    request = expert_pb2.ForwardManyRequest(expert_uids=many, tokens=tokens, inputs=inputs, step=step)
    check(call("ForwardMany", request), REQUEST_CODES, request)


hyper = st.one_of(st.floats(), st.sampled_from([0.0, 1e-8, 0.5, 0.9, 1.0]))
apply_nows = st.one_of(st.none(), st.builds(expert_pb2.ApplyNow, lr=hyper, weight_decay=hyper, beta1=hyper,
                                            beta2=hyper, eps=hyper, max_grad_norm=hyper))


@FUZZ
@given(uid=st.sampled_from(["0.1", "", "9.9"]), call_id=text, step=int64, session_id=text,
       grad_outputs=st.one_of(st.none(), tensors()), inputs=st.one_of(st.none(), tensors()), apply_now=apply_nows)
def test_any_backward_gets_a_request_code(call, uid, call_id, step, session_id, grad_outputs, inputs, apply_now):
    request = expert_pb2.BackwardRequest(expert_uid=uid, call_id=call_id, step=step, session_id=session_id,
                                         grad_outputs=grad_outputs, inputs=inputs, apply_now=apply_now)
    check(call("Backward", request), REQUEST_CODES, request)


@FUZZ
@given(uid=st.sampled_from(["0.1", "", "9.9"]), step=int64, session_id=text, skip=st.booleans(),
       lr=hyper, grad_scale=hyper, weight_decay=hyper, beta1=hyper, beta2=hyper, eps=hyper)
def test_any_apply_step_and_grad_norm_get_a_request_code(call, uid, step, session_id, skip, lr, grad_scale,
                                                         weight_decay, beta1, beta2, eps):
    request = expert_pb2.ApplyStepRequest(expert_uid=uid, step=step, session_id=session_id, skip=skip, lr=lr,
                                          grad_scale=grad_scale, weight_decay=weight_decay, beta1=beta1,
                                          beta2=beta2, eps=eps)
    check(call("ApplyStep", request), REQUEST_CODES, request)
    check(call("GradNorm", expert_pb2.GradNormRequest(expert_uid=uid, step=step, session_id=session_id)),
          REQUEST_CODES, "GradNorm")
