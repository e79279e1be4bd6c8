"""The epoch plan: which samples each rank and DataLoader worker visits, in which batches,
and where an epoch stands, as positions of its order: what a checkpoint saves and a new
configuration resumes from.

An epoch visits ``n`` positions of its order (a pure function of seed and epoch). What has
been consumed is a short list of disjoint ``[start, stop)`` intervals of positions: after
``k`` steps of the strided rank split it is one prefix, for streamed shards one run per
rank. Whatever the world size, batch size or worker count that consumed them, the rest of
the epoch is the positions outside those intervals, in order.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

import torch
from torch.utils.data import get_worker_info

from ..errors import FastMNISTError
from .order import batch_count, delivered, rank_share, runs, samples_per_rank, worker_parts
from .select import Everything

STATE_VERSION = 2
MAX_INTERVALS = 1 << 16  # a few per rank per resume; a state with more is not one of ours
# bounds on a state's step, checked before anything is computed or allocated from it
MAX_STEP = {"batches_done": 1 << 40, "anchor": 1 << 40, "batch_size": 1 << 24, "world_size": 1 << 16,
            "workers": 1 << 10}
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
    the rest are padding (repeats of its start), already covered (``pick`` stops there)."""
    return merge(base, *(pick(base, n, lo, hi) for lo, hi in spans))


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
            most = MAX_STEP[key]
            if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
                raise FastMNISTError(f"state_dict: step's {key} must be an integer in {least}..{most}, "
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


def set_fingerprint(info) -> str:
    """The fingerprint of a split's manifest entry (a ``SplitInfo``), as states record it."""
    described = dataclasses.asdict(info)
    if not described["label_shape"]:  # as before label_shape existed: older states still match
        del described["label_shape"]
    return fingerprint(described)


@dataclasses.dataclass
class Step:
    """An iteration over ``epoch``: of the positions outside ``base``, split among the ranks
    as the plan splits them, each rank has yielded ``done`` batches. With ``workers`` 1,
    those are batches ``0 .. done - 1``, and DataLoader worker ``w`` of ``k`` takes the
    batches numbered ``anchor + w`` modulo ``k``. With ``workers`` k > 1 (a source read in
    consecutive runs), worker ``w`` takes part ``anchor + w`` modulo k of
    ``order.worker_parts`` and the done batches are ``order.delivered``'s. ``total``: the
    batches of this rank, once known."""

    epoch: int
    base: list = dataclasses.field(default_factory=list)
    done: int = 0
    anchor: int = 0
    workers: int = 1
    total: int | None = None

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


@dataclasses.dataclass
class Pass:
    """What one process yields of an epoch: the batches ``numbers`` (ascending) of
    ``share``, this rank's int64 sample indices in order, ``batch_size`` at a time.
    ``upcoming()``: the next epoch's share (for fetching ahead). When the rank's ``k``
    DataLoader workers divide ``share`` into consecutive ``parts`` (``(start, stop)``
    positions), this worker takes ``parts[part]``, and ``fresh`` says that all of them
    start the epoch from its beginning (so they can hand shards to each other)."""

    epoch: int
    share: torch.Tensor
    numbers: range
    batch_size: int
    upcoming: Callable[[], torch.Tensor]
    parts: list[tuple[int, int]] | None
    part: int
    fresh: bool
    step: Step
    workers: int

    def yielded(self, number: int) -> None:
        """Batch ``number`` is being yielded: count what the DataLoader has yielded then."""
        if self.parts is None:
            self.step.done = number + 1
        else:
            first = self.parts[self.part][0] // self.batch_size
            self.step.done = (number - first) * self.workers + self.part + 1

    def finish(self) -> None:
        """Every batch of ``numbers`` was yielded."""
        if self.parts is None:
            self.step.done = self.step.total


class WorkerEpochs:
    """The last epoch DataLoader workers started, and the pass of the DataLoader that
    started it, in one int64 of shared memory (one store, so never read half-written):
    the owner of a loader learns from it what its workers' copies ran. Pickles to a
    spawned worker as the same shared cell, to anything else as a cell of its own."""

    PASS = 0x7FFFFFFF  # the bits of the pass kept, above the 32 of the epoch

    def __init__(self):
        self.value = torch.full((1,), -1, dtype=torch.int64).share_memory_()

    def record(self, iteration: int, epoch: int) -> None:
        self.value[0] = (iteration & self.PASS) << 32 | (epoch & 0xFFFFFFFF)

    def last(self) -> tuple[int, int] | None:
        """``(iteration & PASS, epoch)`` last recorded, or None."""
        v = int(self.value[0])
        return None if v < 0 else (v >> 32, v & 0xFFFFFFFF)

    def take(self) -> int | None:
        """The epoch last recorded (None if none was since the last take), and forget it."""
        ran = self.last()
        self.value[0] = -1
        return None if ran is None else ran[1]

    def __reduce__(self):
        return _worker_epochs, (self.value,)


def _worker_epochs(value: torch.Tensor) -> WorkerEpochs:
    """A ``WorkerEpochs`` around ``value``: the same shared cell when it came through
    torch's multiprocessing pickler (a spawned worker), else (a copy, ``deepcopy``) its own."""
    cell = WorkerEpochs.__new__(WorkerEpochs)
    cell.value = value if value.is_shared() else value.share_memory_()
    return cell


class EpochPlan:
    """Which samples this rank visits in each epoch, in which batches, across DataLoader
    workers; and where the epoch stands (``state_dict``/``load_state_dict``).

    ``source``: what the samples come from (its ``count``, ``order(seed, epoch, shuffle)``
    and ``consecutive``: ranks take consecutive runs of the order, else strided positions).
    ``selection``: which of them an epoch visits (``loading/select.py``; default all). The
    rest as ``FastMNISTLoader`` takes them."""

    def __init__(self, source, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 rank: int, world_size: int, even: bool, selection=None):
        self.selection = selection or Everything(source.count)
        self.source, self.count = source, self.selection.count
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.even = rank, world_size, even
        self.identity = {"set": set_fingerprint(source.info), "order": source.order_name,
                         "seed": seed, "shuffle": shuffle}
        if self.selection.digest is not None:  # a state of one selection is refused by another
            self.identity["selection"] = self.selection.digest
        self.next_epoch = 0
        self.resume = None  # Step the next start() continues, from load_state_dict
        self.step = None  # Step of the iteration in progress (or last run)
        self.workers_ran = WorkerEpochs()
        self._worker_pid = None  # the DataLoader worker process that started or loaded this plan

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank visits per epoch (padding included, dropped tail excluded)."""
        return samples_per_rank(self.count, self.world_size, self.drop_last, self.even, self.rank)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return batch_count(self.samples_per_rank, self.batch_size, self.drop_last)

    def rank_order(self, epoch: int, base: Intervals = ()) -> torch.Tensor:
        """int64 sample indices this rank visits in ``epoch``, in order; of the positions
        outside ``base`` (consumed ones) only."""
        order = self.source.order(self.seed, epoch, self.shuffle) if self.selection.needs_order else None
        order = self.selection.epoch(order, self.seed, epoch)
        if base:
            order = torch.cat([order[a:b] for a, b in gaps(list(base), len(order))])
        return rank_share(order, self.rank, self.world_size, self.drop_last,
                          blocks=self.source.consecutive, even=self.even)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``start`` run ``epoch``; a loaded state of another epoch is dropped."""
        self.take_over()
        self.next_epoch = epoch
        if self.resume is not None and self.resume.epoch != epoch:
            self.resume = None

    def take_over(self) -> int:
        """In the process that owns the loader (not in a DataLoader worker), take over the
        epochs that DataLoader workers ran on their copies of this plan; the next epoch."""
        if get_worker_info() is None:
            ran = self.workers_ran.take()
            if ran is not None:
                self.next_epoch, self.resume, self.step = ran + 1, None, None
        return self.next_epoch

    def start(self, worker: int, workers: int, iteration: int | None = None) -> Pass:
        """Begin the next epoch (or the resumed one) as DataLoader worker ``worker`` of
        ``workers`` (0 of 1 outside a DataLoader); ``iteration``: in a worker, a number the
        same for all workers of one pass of the DataLoader and new with each pass."""
        if iteration is None:
            self.take_over()
            step = self.resume or Step(self.next_epoch)
        else:
            step = self._worker_step(iteration)
        divided = self.source.consecutive and workers > 1  # the rank's workers divide its run
        if step.workers != (workers if divided else 1):  # a fresh layout for what is left of the epoch
            step = Step(step.epoch, self._consumed(self._layout(step)), workers=workers if divided else 1)
        self.resume, self.next_epoch, self.step = None, step.epoch + 1, step
        share = self.rank_order(step.epoch, step.base)
        step.total = batch_count(len(share), self.batch_size, self.drop_last)
        size, parts, part = self.batch_size, None, 0
        if divided:
            # Worker w takes part p = anchor + w (mod k) of the rank's batches, k consecutive
            # parts; the DataLoader collects one batch of each part in turn.
            part = (step.anchor + worker) % workers
            batch_parts = worker_parts(step.total, workers)
            first, count = batch_parts[part]
            numbers = range(first + delivered(step.done, step.total, workers)[part], first + count)
            parts = [(a * size, (a + c) * size) for a, c in batch_parts]
        else:
            # Worker w takes the batches numbered anchor + w (mod k), as the DataLoader
            # collects them round-robin: the same batches in the same order as without workers.
            numbers = range(step.done + (step.anchor + worker - step.done) % workers, step.total, workers)
        return Pass(step.epoch, share, numbers, size, lambda: self.rank_order(step.epoch + 1), parts, part,
                    step.done == 0, step, workers)

    def _worker_step(self, iteration: int) -> Step:
        """The step a DataLoader worker runs. A worker process's first: the epoch its
        siblings of the same ``iteration`` run, else the one after the last that workers
        ran (so passes of a DataLoader whose workers are not persistent go on to the next
        epoch, as iterating the loader does), else this copy's own. Recorded for the
        owner's ``take_over``."""
        step = self.resume or Step(self.next_epoch)
        if self._worker_pid != os.getpid():  # a fresh worker, with the owner's state at its start
            self._worker_pid = os.getpid()
            ran = self.workers_ran.last()
            if ran is not None and ran[0] == iteration & WorkerEpochs.PASS:
                step = step if ran[1] == step.epoch else Step(ran[1])
            elif ran is not None:
                step = Step(ran[1] + 1)
        self.workers_ran.record(iteration, step.epoch)
        return step

    def state_dict(self) -> dict:
        """See ``FastMNISTLoader.state_dict``."""
        self.take_over()
        step = self.step if self.step is not None and not self.step.finished else None
        step = step or self.resume or Step(self.next_epoch)
        layout = self._layout(step)
        return {"version": STATE_VERSION, **self.identity, "epoch": step.epoch,
                "consumed": self._consumed(layout), "step": list(layout.values())}

    def load_state_dict(self, state: dict, in_worker: bool) -> None:
        """See ``FastMNISTLoader.load_state_dict``; ``in_worker``: loaded in a DataLoader
        worker (torchdata restoring each worker's own snapshot)."""
        self.take_over()
        if in_worker:
            self._worker_pid = os.getpid()
        candidates, since_snapshot = loader_states(state)
        if not candidates:
            raise FastMNISTError("state_dict: a StatefulDataLoader state with no worker snapshot in it")
        # the freshest of a StatefulDataLoader's worker states is the one its last batch came with
        state = max((self._consistent(check_state(s, self.identity, self.count)) for s in candidates),
                    key=lambda s: (s["epoch"], count(s["consumed"])))
        if since_snapshot:  # batches the DataLoader yielded after its last snapshot
            state = self._advanced(state, since_snapshot)
        step = state["step"]
        same = step is not None and all(step[k] == v for k, v in (
            ("batch_size", self.batch_size), ("world_size", self.world_size),
            ("drop_last", self.drop_last), ("even", self.even)))
        if same and step["batches_done"] >= self._batches(step, self.rank):
            self.resume = Step(state["epoch"] + 1)
        elif same and (in_worker or step["workers"] == 1):
            # In a DataLoader worker the batches keep their workers; loaded here, worker 0
            # takes the next batch.
            anchor = step["anchor"] if in_worker else step["batches_done"]
            self.resume = Step(state["epoch"], step["base"], step["batches_done"], anchor, step["workers"])
        elif count(state["consumed"]) == self.count:
            self.resume = Step(state["epoch"] + 1)
        else:
            self.resume = Step(state["epoch"], state["consumed"])
        self.next_epoch, self.step = self.resume.epoch, None

    def _consistent(self, state: dict) -> dict:
        """``state`` (checked in form) if its consumed positions are those its step implies."""
        step = state["step"]
        if step is not None:
            if self._consumed(step) != state["consumed"]:
                raise FastMNISTError(f"state_dict: consumed {_shown(state['consumed'])} is not what its step "
                                     f"{_shown(list(step.values()))} implies; the state is damaged")
        return state

    def _consumed(self, step: dict) -> Intervals:
        """The positions consumed once every rank has yielded ``step["batches_done"]``
        batches of the iteration ``step`` (keyed by ``STEP_FIELDS``) lays out."""
        base, done, size = step["base"], step["batches_done"], step["batch_size"]
        rest = self.count - count(base)
        if not self.source.consecutive:  # strided ranks: one prefix of the rest
            return covered(base, self.count, [(0, done * size * step["world_size"])])
        spans = []
        for start, share in runs(rest, step["world_size"], step["drop_last"], step["even"]):
            total = batch_count(share, size, step["drop_last"])
            parts = worker_parts(total, step["workers"])  # one part, unless workers divide the run
            for (first, _), got in zip(parts, delivered(min(done, total), total, len(parts)), strict=True):
                spans.append((start + first * size, start + min((first + got) * size, share)))
        return covered(base, self.count, spans)

    def _advanced(self, state: dict, batches: int) -> dict:
        """``state`` (checked) moved on by ``batches`` more batches of its own step layout."""
        step = state["step"]
        if step is None:
            raise FastMNISTError("state_dict: batches after a snapshot, but no step to count them in")
        step = {**step, "batches_done": step["batches_done"] + batches}
        return {**state, "consumed": self._consumed(step), "step": step}

    def _batches(self, step: dict, rank: int) -> int:
        """Batches ``rank`` has in the iteration ``step`` (a checked state's) describes."""
        rest = self.count - count(step["base"])
        share = samples_per_rank(rest, step["world_size"], step["drop_last"], step["even"], rank)
        return batch_count(share, step["batch_size"], step["drop_last"])

    def _layout(self, step: Step) -> dict:
        """``step`` with this plan's batch size and split rules, keyed by ``STEP_FIELDS``."""
        return dict(zip(STEP_FIELDS, [step.base, step.done, step.anchor, self.batch_size,
                                      self.world_size, self.drop_last, self.even, step.workers], strict=True))


def loader_states(state) -> tuple[list, int]:
    """The loader states in ``state`` and the batches yielded since they were taken: itself
    (0), or those a torchdata ``StatefulDataLoader`` holds (one per worker, or its dataset's
    when it has no workers) and its steps since its last snapshot."""
    if not isinstance(state, dict) or "version" in state:
        return [state], 0
    if "dataset_state" in state:  # StatefulDataLoader without workers
        return [state["dataset_state"]], 0
    snapshot, since = state.get("_snapshot"), state.get("_steps_since_snapshot", 0)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("_worker_snapshots"), dict) \
            or not isinstance(since, int) or since < 0:
        return [state], 0  # refused by check_state, naming what it is
    return [w.get("dataset_state") if isinstance(w, dict) else w
            for w in snapshot["_worker_snapshots"].values()], since
