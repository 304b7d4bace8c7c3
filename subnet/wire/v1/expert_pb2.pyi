from subnet.wire.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("expert_uid", "inputs", "call_id", "step", "training", "reply_shm", "committed_round")
    EXPERT_UID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHM_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    expert_uid: str
    inputs: _tensor_pb2.Tensor
    call_id: str
    step: int
    training: bool
    reply_shm: _tensor_pb2.ShmReply
    committed_round: int
    def __init__(self, expert_uid: _Optional[str] = ..., inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., call_id: _Optional[str] = ..., step: _Optional[int] = ..., training: _Optional[bool] = ..., reply_shm: _Optional[_Union[_tensor_pb2.ShmReply, _Mapping]] = ..., committed_round: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _tensor_pb2.Tensor
    def __init__(self, outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ForwardManyRequest(_message.Message):
    __slots__ = ("expert_uids", "tokens", "inputs", "step")
    EXPERT_UIDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    expert_uids: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    inputs: _tensor_pb2.Tensor
    step: int
    def __init__(self, expert_uids: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[int]] = ..., inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class ForwardManyResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _tensor_pb2.Tensor
    def __init__(self, outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("expert_uid", "call_id", "step", "grad_outputs", "inputs", "session_id", "reply_shm", "apply_now")
    EXPERT_UID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_SHM_FIELD_NUMBER: _ClassVar[int]
    APPLY_NOW_FIELD_NUMBER: _ClassVar[int]
    expert_uid: str
    call_id: str
    step: int
    grad_outputs: _tensor_pb2.Tensor
    inputs: _tensor_pb2.Tensor
    session_id: str
    reply_shm: _tensor_pb2.ShmReply
    apply_now: ApplyNow
    def __init__(self, expert_uid: _Optional[str] = ..., call_id: _Optional[str] = ..., step: _Optional[int] = ..., grad_outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., session_id: _Optional[str] = ..., reply_shm: _Optional[_Union[_tensor_pb2.ShmReply, _Mapping]] = ..., apply_now: _Optional[_Union[ApplyNow, _Mapping]] = ...) -> None: ...

class ApplyNow(_message.Message):
    __slots__ = ("lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float
    def __init__(self, lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_inputs", "version")
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: _tensor_pb2.Tensor
    version: int
    def __init__(self, grad_inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GradNormRequest(_message.Message):
    __slots__ = ("expert_uid", "step", "session_id")
    EXPERT_UID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    expert_uid: str
    step: int
    session_id: str
    def __init__(self, expert_uid: _Optional[str] = ..., step: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class GradNormResponse(_message.Message):
    __slots__ = ("sq_norm", "backward_calls")
    SQ_NORM_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_CALLS_FIELD_NUMBER: _ClassVar[int]
    sq_norm: float
    backward_calls: int
    def __init__(self, sq_norm: _Optional[float] = ..., backward_calls: _Optional[int] = ...) -> None: ...

class ApplyStepRequest(_message.Message):
    __slots__ = ("expert_uid", "step", "lr", "grad_scale", "weight_decay", "beta1", "beta2", "eps", "session_id", "skip")
    EXPERT_UID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    expert_uid: str
    step: int
    lr: float
    grad_scale: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    session_id: str
    skip: bool
    def __init__(self, expert_uid: _Optional[str] = ..., step: _Optional[int] = ..., lr: _Optional[float] = ..., grad_scale: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., session_id: _Optional[str] = ..., skip: _Optional[bool] = ...) -> None: ...

class ApplyStepResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("uid", "dim", "inter_dim", "param_dtype", "version", "queued_tokens")
    UID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INTER_DIM_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    dim: int
    inter_dim: int
    param_dtype: _tensor_pb2.DType
    version: int
    queued_tokens: int
    def __init__(self, uid: _Optional[str] = ..., dim: _Optional[int] = ..., inter_dim: _Optional[int] = ..., param_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., version: _Optional[int] = ..., queued_tokens: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("experts", "wire_dtypes", "max_tokens", "max_message_bytes", "device", "server_version", "shm_host_id", "frames_port")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHM_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PORT_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    wire_dtypes: _containers.RepeatedScalarFieldContainer[_tensor_pb2.DType]
    max_tokens: int
    max_message_bytes: int
    device: str
    server_version: str
    shm_host_id: str
    frames_port: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ..., wire_dtypes: _Optional[_Iterable[_Union[_tensor_pb2.DType, str]]] = ..., max_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device: _Optional[str] = ..., server_version: _Optional[str] = ..., shm_host_id: _Optional[str] = ..., frames_port: _Optional[int] = ...) -> None: ...
