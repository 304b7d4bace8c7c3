"""OpenAI-style request parsing and the text assembly of completions (no model, no sockets)."""

from __future__ import annotations

import pytest

from services.router.completions import TextAssembler, parse_request
from services.router.generation import GenerateParams, RequestError


def letters(ids):
    return "".join(chr(97 + i) for i in ids)


def run(ids, stop=(), decode=letters):
    """(pieces handed out, finish reason) for a sequence of generated ids."""
    text, pieces = TextAssembler(decode, stop), []
    for i in ids:
        pieces.append(text.add(i))
        if text.finish:
            break
    else:
        pieces.append(text.flush())
    return pieces, text.finish


def test_defaults_and_neutral_fields():
    request = parse_request({"prompt": "hi", "model": "x", "top_p": 1.0, "n": 1, "echo": False,
                             "logit_bias": {}, "presence_penalty": 0}, max_new_tokens=512)
    assert request.params == GenerateParams(max_new_tokens=16, temperature=1.0, top_k=0, seed=None)
    assert (request.prompt, request.stream, request.stop) == ("hi", False, ())
    assert parse_request({"prompt": "hi"}, max_new_tokens=4).params.max_new_tokens == 4   # default within the limit
    request = parse_request({"prompt": "hi", "max_tokens": 3, "temperature": 0, "top_k": 5, "seed": 0,
                             "stop": "\n", "stream": True}, max_new_tokens=512)
    assert request.params == GenerateParams(3, 0.0, 5, 0) and request.stop == ("\n",) and request.stream


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "hi", "n": True}, "n=True is not supported"),
    ({"prompt": "hi", "echo": True}, "echo=True"),
    ({"prompt": "hi", "logprobs": 0}, "logprobs=0"),
    ({"prompt": "hi", "temperature": float("nan")}, "finite"),
    ({"prompt": "hi", "seed": 2**64}, "seed must fit in 64 bits"),
    ({"prompt": "hi", "seed": 1.5}, "seed must be an integer"),
    ({"prompt": "hi", "top_k": -1}, "top_k must be >= 0"),
    ({"prompt": "hi", "stop": ""}, "stop must be"),
    ({"prompt": "hi", "stop": [1]}, "stop must be"),
])
def test_refusals_name_the_field(body, fragment):
    with pytest.raises(RequestError) as info:
        parse_request(body, max_new_tokens=512)
    assert fragment in str(info.value)


def test_text_without_stop_comes_out_token_by_token():
    assert run([0, 1, 2]) == (["a", "b", "c", ""], "length")


def test_a_stop_sequence_across_tokens_is_held_back_then_cut():
    # "b" could start the stop "bc": held back; "bd" is not it, so both go out together.
    assert run([0, 1, 3, 1, 2, 4], stop=["bc"]) == (["a", "", "bd", "", ""], "stop")
    assert "".join(run([0, 1, 3, 1, 2, 4], stop=["bc"])[0]) == "abd"
    # A prefix of a stop that never completes is sent at the end.
    assert run([0, 1], stop=["bc"]) == (["a", "", "b"], "length")
    # The earliest of several stops wins.
    assert "".join(run([0, 1, 2, 3], stop=["cd", "b"])[0]) == "a"


def test_a_character_split_over_tokens_comes_out_whole():
    utf8 = "é".encode()                             # two bytes, one token each
    decode = lambda ids: bytes(utf8[i] for i in ids).decode("utf-8", "replace")  # noqa: E731
    assert run([0, 1], decode=decode) == (["", "é", ""], "length")
