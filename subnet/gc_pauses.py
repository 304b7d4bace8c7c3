"""Keep the cyclic garbage collector's full passes short in long-running services.

    from subnet.gc_pauses import freeze_startup_objects
    freeze_startup_objects()    # once the model / weights are loaded, before serving

CPython's collector stops the process for a full (generation 2) pass every so often, and a full
pass walks every tracked object. A router or expert service holds a few hundred thousand of them
from start-up alone (torch, grpc, protobuf, bittensor modules, the model): measured on the router of
`bench --only serving`, one such pass took 72 ms, and every stream's next token waited for it (the
16-stream p99 went from 26 to 95 ms in the burst where it fell). Freezing moves everything alive
at that moment into a generation the collector never walks, so later full passes see only what
was created since. The cost: a frozen object that later becomes garbage inside a reference cycle
is never reclaimed (objects freed by reference counting still are), which is why this runs once,
after start-up, on objects that live as long as the process anyway.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object still alive; returns how many are frozen in all."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's full passes", frozen)
    return frozen
