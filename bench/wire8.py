"""Part: the int8 wire dtype against fp32 and bf16 on one (4096, 1024) activation tensor.

    python -m bench --only wire8

For each wire dtype: milliseconds of `encode` and of `decode` (the codec alone, in this
process, one torch thread as in the expert services; best of interleaved rounds, bench.timing),
the payload bytes (`data`, without the few bytes of protobuf framing), and the error of the
round trip: max |error| / max |x| and the RMS error relative to the RMS of x.
What the error costs in training is measured by `python -m bench.wire8_learning`.
"""

from __future__ import annotations

import torch

from bench.timing import best_times
from subnet.tensor_codec import decode, encode

SHAPE = (4096, 1024)          # 4096 tokens of a 1024-wide layer: 16 MiB in fp32
WIRES = ("fp32", "bf16", "int8")


def run(rounds: int = 5) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(rounds)
    finally:
        torch.set_num_threads(threads)


def _measure(rounds: int) -> dict:
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    msgs = {wire: encode(x, wire) for wire in WIRES}
    variants = {}
    for wire in WIRES:
        variants[f"{wire}_encode"] = lambda wire=wire: encode(x, wire)
        variants[f"{wire}_decode"] = lambda wire=wire: decode(msgs[wire])
    ms = {name: t * 1e3 for name, t in best_times(variants, rounds=rounds).items()}
    out: dict = {"shape": list(SHAPE)}
    for wire in WIRES:
        err = decode(msgs[wire]) - x
        out[wire] = {"encode_ms": ms[f"{wire}_encode"], "decode_ms": ms[f"{wire}_decode"],
                     "round_trip_ms": ms[f"{wire}_encode"] + ms[f"{wire}_decode"],
                     "bytes": len(msgs[wire].data), "bytes_vs_fp32": len(msgs[wire].data) / (4 * x.numel()),
                     "max_err_over_absmax": float(err.abs().max() / x.abs().max()),
                     "rms_err_rel": float(err.square().mean().sqrt() / x.square().mean().sqrt())}
    out["definition"] = ("codec only, 1 torch thread, best of interleaved rounds; bytes = the Tensor's data field; "
                         "errors of decode(encode(x)) for x ~ N(0, 1)")
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=2))
