"""The verification gate: does the miner's live service compute what its published weights compute?

The validator sends the round's probe activations to the endpoint the miner's signed manifest
names for each expert (one signed, non-training Forward per expert, all in flight at once) and
compares the answers with the published weights' outputs on the same inputs. Not the Redis
registry: every miner can write it, so a rival could delete the miner's entries, or add entries
in its name that point nowhere, and fail it (a miner that declares another's endpoint gets answers
signed by that other hotkey, which the client refuses).
Weights keep training between the commit and the validate phase, so the thresholds allow a
little drift; a service serving other weights, or none, fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import torch

from services.validator.scoring import live_mismatch, max_abs_diff, output_cosine
from subnet.expert_client import ExpertClientPool
from subnet.tensor_codec import TensorError, decode, encode


@dataclass(frozen=True)
class LiveThresholds:
    min_cosine: float
    max_abs: float
    timeout_s: float


def check_live(endpoints: Mapping[str, str | None], clients: ExpertClientPool, hotkey: str,
               probes: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], limits: LiveThresholds,
               round: int | None = None) -> tuple[str, dict]:
    """("" or the reason the gate fails, {uid: [{endpoint, cosine, max_abs}]}). `endpoints` maps
    each of the miner's uids to where its manifest says it serves it (None: the manifest names
    none); `probes` and `expected` to inputs (n, dim) and published outputs (n, dim). `round`: the
    probes ask for the weights committed in it (an honest service keeps them and answers exactly;
    one that does not answers with its live weights, held to the thresholds)."""
    missing = [uid for uid in sorted(probes) if not endpoints.get(uid)]
    if missing:
        return (f"the checkpoint of expert {', '.join(missing)} names no endpoint of a live service "
                f"(manifest format 1)"), {}
    calls = []
    for uid in sorted(probes):
        endpoint = endpoints[uid]
        client = clients.get(endpoint, hotkey)   # the answer must be signed by `hotkey`
        future = client.forward(uid, encode(probes[uid].float()), call_id=f"validate-{uuid.uuid4().hex[:12]}",
                                step=0, training=False, timeout_s=limits.timeout_s, committed_round=round)
        calls.append((uid, endpoint, future))
    details: dict[str, list[dict]] = {}
    reason = ""
    for uid, endpoint, future in calls:  # every answer is awaited: none is left running
        try:
            out = decode(future.result().outputs, expected_dim=probes[uid].shape[1],
                         max_elements=probes[uid].numel(), name="outputs")
            if out.shape != expected[uid].shape:
                raise TensorError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"shape {tuple(out.shape)}, expected {tuple(expected[uid].shape)}")
        except grpc.RpcError as e:
            details.setdefault(uid, []).append({"endpoint": endpoint, "error": f"{e.code().name}: {e.details()}"})
            reason = reason or (f"live service {endpoint} of expert {uid} is unreachable or refused the probe "
                                f"({e.code().name}: {e.details()})")
            continue
        except TensorError as e:
            details.setdefault(uid, []).append({"endpoint": endpoint, "error": str(e)})
            reason = reason or f"live service {endpoint} of expert {uid} answered malformed outputs: {e}"
            continue
        cosine, max_abs = output_cosine(out, expected[uid]), max_abs_diff(out, expected[uid])
        details.setdefault(uid, []).append({"endpoint": endpoint, "cosine": cosine, "max_abs": max_abs})
        mismatch = live_mismatch(cosine, max_abs, limits.min_cosine, limits.max_abs)
        if mismatch and not reason:
            reason = f"{mismatch} for expert {uid} at {endpoint}"
    return reason, details
