"""A processor's state for one call, owned by the runtime: :class:`BatchState` reads each entry once,
hands the processor its working copy, and writes every changed entry once, in an order that keeps any
prefix of the writes a state to continue from (the contract: streams/runtime/processor.py).

Why the order matters. The app writes each state change as a changelog record (streams/runtime/app.py), and
after a crash the state is restored from what the changelog kept: a prefix of the writes, in the order they
were
made. So, within one call:

1. every key is written at most once: one changelog record per key and batch, however many records were
   folded into the entry;
2. writes go in the order the processor names by key prefix (``order``): every key starting with
   ``order[0]`` first, then ``order[1]`` and so on, then the rest; within a group, by key, so the writes do
   not depend on how the batch was walked. A processor lists first what a later write relies on, so that no
   prefix holds a write without what it relies on:

   - rollups, parents before children (``y|``, ``m|``, ``d|``, ``h|``): an hour is marked final only after
     its day holds it, so a restored day never misses an hour that says it was merged;
   - the merge, bucket entries before the senders' progress: a restored progress never covers a bucket the
     restored state lacks;
   - costs, months, days and hour buckets before the index and the job entries whose offsets mark a
     record as folded: a restored job never claims hours its buckets lack;
   - alerts, the no-data index before the entries: a restored index never misses a firing entry;
3. deletes go last: a prefix that stops before them holds entries that could have gone (pruned, or final
   and committed), which the processor drops again; never one that lacks what it needs.

Replays. Each entry that folds records remembers the offset of the last one under :data:`OFFSET`, and a
processor skips records at or below it (:func:`offset_of`). State written before the field had one name
kept it as ``"o"`` (rollups' entries, anomalies' sent findings, the app's own progress records);
:meth:`BatchState.get` renames it in the entries it loads and :func:`offset_of` reads either, so a
changelog written by that version still loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["LEGACY_OFFSET", "OFFSET", "BatchState", "copy_entry", "offset_of"]

OFFSET = "offset"
"""The field of a state entry holding the offset of the last record folded into it."""
LEGACY_OFFSET = "o"
"""What :data:`OFFSET` was called in rollup entries, anomaly findings and the app's progress records before
it had one name: read, never written."""


def copy_entry(value: Any) -> Any:
    """A copy of a state entry (JSON-shaped: dicts, lists and scalars) that shares nothing mutable with it:
    ``copy.deepcopy``'s result for such values at about a third of its cost (no memo, no dispatch), for
    processors that change nested entries in place (``BatchState(load=copy_entry)``) once per entry and
    batch. A tuple is kept as is: the state holds none with anything mutable inside."""
    kind = type(value)
    if kind is dict:
        return {key: copy_entry(item) for key, item in value.items()}
    if kind is list:
        return [copy_entry(item) for item in value]
    return value


def offset_of(entry: Mapping[str, Any], default: int = -1) -> int:
    """The replay offset of ``entry`` (or of an item remembered in it), under either name."""
    found = entry.get(OFFSET)
    if found is None:
        found = entry.get(LEGACY_OFFSET)
    return default if found is None else found


class BatchState:
    """One call's view of ``state`` (the app's view of the processor's table for one topic partition).

    ``get`` reads a key once and keeps what it gave: ``load(stored value)`` when given, a copy (a processor
    that changes entries in place and may leave one unwritten, so that the store never holds a change its
    changelog lacks) or the value made whole again after a restore from JSON. ``put`` and ``delete`` take
    effect in :meth:`flush`, which the processor calls once at the end of the call, writing ``dump(value)``
    when given: a processor that works on its own types (streams/rollups/aggregate.py) stores their JSON form.
    ``order``: the key prefixes to write first (module doc).
    """

    __slots__ = ("_deleted", "_dirty", "_dump", "_load", "_order", "_state", "_values")

    def __init__(
        self,
        state: MutableMapping[str, Any],
        *,
        order: Sequence[str] = (),
        load: Callable[[Any], Any] | None = None,
        dump: Callable[[Any], Any] | None = None,
    ) -> None:
        self._state = state
        self._order = tuple(order)
        self._load = load
        self._dump = dump
        self._values: dict[str, Any] = {}
        self._dirty: dict[str, None] = {}
        self._deleted: set[str] = set()

    @property
    def stored(self) -> MutableMapping[str, Any]:
        """The state as it was before this call (nothing is written to it before :meth:`flush`)."""
        return self._state

    def get(self, key: str) -> Any:
        """The entry under ``key`` as this call left it: put, deleted (None) or as stored; None if none."""
        try:
            return self._values[key]
        except KeyError:
            pass
        value = self._state.get(key)
        if value is not None:
            if self._load is not None:
                value = self._load(value)
            if type(value) is dict and LEGACY_OFFSET in value and OFFSET not in value:
                value[OFFSET] = value.pop(LEGACY_OFFSET)
        self._values[key] = value
        return value

    def put(self, key: str, value: Any) -> None:
        """Write ``value`` under ``key`` at :meth:`flush` (again in the same call: the last one counts)."""
        self._values[key] = value
        self._dirty[key] = None
        self._deleted.discard(key)

    def delete(self, key: str) -> None:
        """Delete ``key`` at :meth:`flush`, after every write."""
        self._values[key] = None
        self._deleted.add(key)
        self._dirty.pop(key, None)

    def written(self, key: str) -> bool:
        """Whether this call puts ``key``."""
        return key in self._dirty

    def written_keys(self) -> Iterable[str]:
        """The keys this call puts, in the order first put."""
        return self._dirty.keys()

    def live_keys(self) -> list[str]:
        """Every key with an entry: stored or put in this call, less those deleted in it; sorted. Scans the
        whole store: for the occasional pass (a resumed partition, a prune), not per record."""
        found = {key for key in list(self._state) if key not in self._deleted}
        found.update(self._dirty)
        return sorted(found)

    def flush(self) -> None:
        """Write every put entry once (``dump`` of it, when given), in ``order`` (module doc), then
        delete."""
        order = self._order
        dump = self._dump

        def rank(key: str) -> tuple[int, str]:
            return next((i for i, prefix in enumerate(order) if key.startswith(prefix)), len(order)), key

        state, values = self._state, self._values
        for key in sorted(self._dirty, key=rank):
            state[key] = values[key] if dump is None else dump(values[key])
        for key in self._deleted:
            if key in state:
                del state[key]
        self._dirty.clear()
        self._deleted.clear()
