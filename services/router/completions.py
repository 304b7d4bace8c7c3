"""OpenAI-style completions over the RouterEngine: the request fields, stop sequences, the answers.

    request = parse_request(json.loads(body), max_new_tokens=engine.max_new_tokens)  # RequestError
    text = TextAssembler(engine.decode, request.stop)
    for token in engine.generate(engine.prompt(request.prompt), request.params):
        send(text.add(token.id))
        if text.finish: break
    send(text.flush())

Fields (https://platform.openai.com/docs/api-reference/completions): `prompt` (one string),
`max_tokens` (default 16, or ROUTER_MAX_NEW_TOKENS if lower), `temperature` (default 1,
0 = greedy, else at least 0.01), `top_k` (an extension, 0 = off), `seed`, `stop` (a string or up
to 4), `stream`.
`model` and `user` are accepted and ignored. Fields that would change the result are refused
unless they hold their neutral value: `top_p` 1 (nucleus sampling is not implemented),
`n`/`best_of` 1, `echo` false, `logprobs`/`suffix`/`logit_bias` null, the penalties 0. Any
other field is refused, so a typo never goes unnoticed. Limits are the gRPC ones (`check_params`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.router.generation import GenerateParams, RequestError, check_params

MAX_STOP = 4
DEFAULT_MAX_TOKENS = 16
_NAMES = {"max_new_tokens": "max_tokens"}   # GenerateParams field -> this API's field
_NEUTRAL = {"top_p": 1, "n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
            "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}
_IGNORED = {"model", "user"}
_FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "seed", "stop", "stream"}


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    params: GenerateParams
    stream: bool
    stop: tuple[str, ...]


def _number(body: dict, name: str, default, kinds: tuple[type, ...]):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if kinds == (int,) else "a number"
        raise RequestError(f"{name} must be {kind}, got {value!r}")
    return value


def _float(body: dict, name: str, default: float) -> float:
    """A number field as a float; an integer too large for one (JSON allows 1000 digits) is refused as
    not finite, as 1e400 is, instead of failing the request with an OverflowError."""
    value = _number(body, name, default, (int, float))
    try:
        return float(value)
    except OverflowError:
        raise RequestError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None


def parse_request(body: object, max_new_tokens: int) -> CompletionRequest:
    """The request in `body` (parsed JSON), checked against the router's limits; RequestError else."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with at least `prompt`")
    unknown = sorted(set(body) - _FIELDS - set(_NEUTRAL) - _IGNORED)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; this API takes {', '.join(sorted(_FIELDS))}")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and (value != neutral or isinstance(value, bool) != isinstance(neutral, bool)) \
                and not (name == "logit_bias" and value == {}):
            raise RequestError(f"{name}={value!r} is not supported; leave it out (or {neutral!r})")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt must be one string (lists of prompts and token arrays are not supported)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:   # JSON's "\ud800" escape: no tokenizer takes it
        raise RequestError(f"prompt is not valid Unicode: a lone surrogate {prompt[e.start]!r} at character "
                           f"{e.start}; send text that encodes as UTF-8") from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them")
    default_tokens = min(DEFAULT_MAX_TOKENS, max_new_tokens)   # OpenAI's default, within this router's limit
    params = GenerateParams(max_new_tokens=_number(body, "max_tokens", default_tokens, (int,)),
                            temperature=_float(body, "temperature", 1.0),
                            top_k=_number(body, "top_k", 0, (int,)),
                            seed=_number(body, "seed", None, (int,)))
    check_params(params, max_new_tokens, _NAMES)
    return CompletionRequest(prompt, params, stream, tuple(stop))


class TextAssembler:
    """Turns generated token ids into the text to send, piece by piece.

    The whole sequence is decoded each time, so a character spread over several tokens comes
    out whole. Text that may be the start of a stop sequence (or an unfinished character) is
    held back until it is clear; at a stop sequence the text ends before it and `finish`
    becomes "stop".
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode, self._stop = decode, tuple(stop)
        self._ids: list[int] = []
        self._sent = 0          # characters of the decoded text handed out so far
        self.finish: str | None = None

    def add(self, token_id: int) -> str:
        """The text that can be sent now that `token_id` was generated (maybe empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        hits = [i for i in (text.find(s, max(0, self._sent - len(s) + 1)) for s in self._stop) if i >= 0]
        if hits:
            self.finish = "stop"
            return self._take(text, max(min(hits), self._sent))
        held = len(text) - len(text.rstrip("\ufffd"))   # an unfinished multi-byte character
        for s in self._stop:
            held = max(held, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])), 0))
        return self._take(text, max(len(text) - held, self._sent))

    def flush(self) -> str:
        """Whatever was held back, at the end of generation (no stop sequence came)."""
        if self.finish is None:
            self.finish = "length"
            return self._take(self._decode(self._ids), None)
        return ""

    @property
    def tokens(self) -> int:
        return len(self._ids)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self._sent:end]
        self._sent += len(piece)
        return piece


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion(cid: str, created: int, model: str, text: str, finish: str, prompt_tokens: int,
               completion_tokens: int, masked_calls: int) -> dict:
    """The non-streaming answer. `masked_calls` (an extension): expert calls masked producing it."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "masked_calls": masked_calls}


def chunk(cid: str, created: int, model: str, text: str, finish: str | None = None) -> dict:
    """One server-sent event of a streamed answer; the last one carries `finish_reason`."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
