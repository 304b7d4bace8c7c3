from subnet.wire.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_tokens", "max_new_tokens", "temperature", "top_k", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "text", "masked_calls")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MASKED_CALLS_FIELD_NUMBER: _ClassVar[int]
    token: int
    text: str
    masked_calls: int
    def __init__(self, token: _Optional[int] = ..., text: _Optional[str] = ..., masked_calls: _Optional[int] = ...) -> None: ...

class LogitsRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class LogitsResponse(_message.Message):
    __slots__ = ("logits", "masked_calls")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    MASKED_CALLS_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    masked_calls: int
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., masked_calls: _Optional[int] = ...) -> None: ...

class RouterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterInfoResponse(_message.Message):
    __slots__ = ("vocab_size", "block_size", "n_layer", "dim", "n_experts", "n_activated_experts", "expert_uids", "live_replicas", "step")
    class LiveReplicasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_LAYER_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    N_ACTIVATED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_UIDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    block_size: int
    n_layer: int
    dim: int
    n_experts: int
    n_activated_experts: int
    expert_uids: _containers.RepeatedScalarFieldContainer[str]
    live_replicas: _containers.ScalarMap[str, int]
    step: int
    def __init__(self, vocab_size: _Optional[int] = ..., block_size: _Optional[int] = ..., n_layer: _Optional[int] = ..., dim: _Optional[int] = ..., n_experts: _Optional[int] = ..., n_activated_experts: _Optional[int] = ..., expert_uids: _Optional[_Iterable[str]] = ..., live_replicas: _Optional[_Mapping[str, int]] = ..., step: _Optional[int] = ...) -> None: ...
