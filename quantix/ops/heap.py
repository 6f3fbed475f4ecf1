"""Keep the cyclic garbage collector's full passes short once the daemon is up.

What start-up builds (modules, classes, the service tree: about 72,000 objects) lives as long
as the process, yet every full (generation 2) collection walks all of it again while holding the
GIL, in whichever thread triggered it. Under the 200-client storm of
``bench/bench_reactor_lag.py`` such passes took 40-80 ms: the reactor's worst ticks. Freezing
what exists once the node is ready (:func:`gc.freeze`) takes it out of the collector's view; a
later pass walks only what was made since (about a fifth as much).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then freeze every surviving object; returns how many are frozen.

    Called once per process (twistd's, or a benchmark standing in for it), never per node: tests
    build many nodes in one process, and frozen objects are never collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
