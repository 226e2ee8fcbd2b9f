"""Test-only fault injection: make this process die at a named point, to prove recovery works.

``SAM_BENCH_FAULT=<point>@<n>[:<SIGNAL>]`` sends ``SIGNAL`` (default KILL) to this process the
``n``-th time it reaches ``<point>``. Points: ``step`` (after an optimizer step),
``checkpoint_partial`` (half of the temporary file written), ``checkpoint_written`` (the next
checkpoint complete on disk, not yet rotated in), ``checkpoint_rotated`` (the newest renamed to
``.prev``, the next not yet renamed to newest). Unset (always, outside the tests) it costs one dict
lookup per call.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SAM_BENCH_FAULT"
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    """Die here if ``SAM_BENCH_FAULT`` names this point and occurrence."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[name] += 1
    point, _, rest = spec.partition("@")
    count, _, sig = rest.partition(":")
    if point == name and _reached[name] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
