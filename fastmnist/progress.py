"""Where an epoch stands, as positions of its order: what a checkpoint saves and a new
configuration resumes from.

An epoch visits ``n`` positions of its order (a pure function of seed and epoch). What has
been consumed is a short list of disjoint ``[start, stop)`` intervals of positions: after
``k`` steps of the strided rank split it is one prefix, for streamed shards one run per
rank. Whatever the world size, batch size or worker count that consumed them, the rest of
the epoch is the positions outside those intervals, in order.
"""

import hashlib
import json

from .errors import FastMNISTError

STATE_VERSION = 2
MAX_INTERVALS = 1 << 16  # a few per rank per resume; a state with more is not one of ours
# The "step" of a state: a list rather than an object, so that torchdata's per-batch
# snapshots (which flatten nested objects key by key) stay cheap.
STEP_FIELDS = ("base", "batches_done", "anchor", "batch_size", "world_size", "drop_last", "even", "workers")
Intervals = list[list[int]]  # sorted, disjoint, non-empty [start, stop) pairs


def merge(*parts: Intervals) -> Intervals:
    """The union of interval lists, sorted and with touching intervals joined."""
    merged = []
    for start, stop in sorted(i for part in parts for i in part):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def gaps(consumed: Intervals, n: int) -> Intervals:
    """The intervals of ``[0, n)`` outside ``consumed``."""
    out, at = [], 0
    for start, stop in consumed:
        if start > at:
            out.append([at, start])
        at = stop
    return out + ([[at, n]] if at < n else [])


def count(intervals: Intervals) -> int:
    return sum(stop - start for start, stop in intervals)


def pick(consumed: Intervals, n: int, first: int, last: int) -> Intervals:
    """The positions of the ``first``-th to ``last - 1``-th of those outside ``consumed``
    (counting from 0, in order), as intervals. O(len(consumed)), whatever ``n``."""
    out, skipped = [], 0
    for start, stop in gaps(consumed, n):
        lo, hi = max(first - skipped, 0), min(last - skipped, stop - start)
        if lo < hi:
            out.append([start + lo, start + hi])
        skipped += stop - start
        if skipped >= last:
            break
    return out


def covered(base: Intervals, n: int, spans: list[tuple[int, int]]) -> Intervals:
    """``base`` plus the positions that ``spans`` of the rest cover: ``(lo, hi)`` counts
    the ``n - count(base)`` positions outside ``base`` in order, from 0. Positions beyond
    the rest are padding (repeats of its start), already covered."""
    rest = n - count(base)
    return merge(base, *(pick(base, n, lo, min(hi, rest)) for lo, hi in spans))


def fingerprint(identity: dict) -> str:
    """A short hex digest of ``identity`` (JSON-serialisable), naming a split's samples."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def check_state(state, expected: dict, n: int) -> dict:
    """``state`` if it is a well-formed loader state for this loader (same ``expected``
    identity: set, order, seed, shuffle; intervals inside ``[0, n)``), with its "step" as an
    object keyed by ``STEP_FIELDS``; otherwise a FastMNISTError saying what is wrong or what
    differs."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise FastMNISTError(f"not a fastmnist loader state (version {STATE_VERSION}): "
                             f"{_shown(state)}")
    for key, mine in expected.items():
        if state.get(key) != mine:
            raise FastMNISTError(f"state_dict was saved with {key}={_shown(state.get(key))}, "
                                 f"this loader has {key}={mine!r}")
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise FastMNISTError(f"state_dict: epoch must be a non-negative integer, got {_shown(epoch)}")
    _check_intervals(state.get("consumed"), n, "consumed")
    step = state.get("step")
    if step is not None:
        if not isinstance(step, list) or len(step) != len(STEP_FIELDS):
            raise FastMNISTError(f"state_dict: step must be a list of {', '.join(STEP_FIELDS)}, "
                                 f"got {_shown(step)}")
        step = dict(zip(STEP_FIELDS, step, strict=True))
        _check_intervals(step["base"], n, "step's base")
        for key, least in (("batches_done", 0), ("anchor", 0), ("batch_size", 1), ("world_size", 1),
                           ("workers", 1)):
            value = step[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise FastMNISTError(f"state_dict: step's {key} must be an integer >= {least}, "
                                     f"got {_shown(value)}")
        if not isinstance(step["drop_last"], bool) or not isinstance(step["even"], bool):
            raise FastMNISTError("state_dict: step's drop_last and even must be true or false")
    return {**state, "step": step}


def _check_intervals(intervals, n: int, name: str) -> None:
    ok = isinstance(intervals, list) and len(intervals) <= MAX_INTERVALS and all(
        isinstance(i, list) and len(i) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in i)
        for i in intervals)
    if ok:
        flat = [v for i in intervals for v in i]
        ok = all(0 <= a < b <= n for a, b in intervals) and flat == sorted(flat)
    if not ok:
        raise FastMNISTError(f"state_dict: {name} must be sorted, disjoint [start, stop) intervals "
                             f"within 0..{n}, got {_shown(intervals)}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
