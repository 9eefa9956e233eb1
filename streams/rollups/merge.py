"""The merge of partial rollups: S1 rollups of the series whose records their topic spreads over several
partitions (``Metric.spans_partitions`` in bus/catalogue.py: job_queue_wait_seconds {queue, project} on
job.events, which is keyed by job_id).

Rollup state lives per input partition (streams/runtime/processor.py), so each partition holds only a part of
such a series; published as Rollups under one (series, tier, bucket) key, the parts would overwrite each
other.
Instead::

    job.events[p] ──RollupProcessor──► streams.rollup-partials (key: series)
        partials: partition p's own absolute rollup of one (series, tier, bucket), sent where the rollup
                  would have gone out (upserts, finals, re-sends after a restart), tagged with its sender
                  (source topic, partition);
        progress: whenever p closes buckets, ``closed_before`` (its watermark minus the lateness) to every
                  partition the topic catalogue gives streams.rollup-partials: every bucket of p ending
                  at or before it is final;
    streams.rollup-partials ──RollupMerger──► rollups: the merged Rollup of each (series, tier, bucket).

Why partials and not a repartition of the raw records: a repartitioner re-sends the records after a crash
at new offsets, where the offset check that makes replays harmless cannot see them, and a merged partition's
watermark would mix senders read at their own pace (a backlog read one partition after the other would make
the later ones late). A partial is absolute and each sender keeps its own watermark and lateness, so a
re-sent partial replaces and never adds, and what is late stays exactly what it is for any other metric.

Merge, per (series, tier, bucket): the latest partial of each sender, latest in the sender's own order,
not in arrival order (a worker that lost its partition may still deliver an older one): a sender's
partial of a bucket only ever grows, one record (or one merged hour) at a time, and is the same for the same
count, so the partial with the larger (count, final) wins and an equal one changes nothing. The merged
count, sum, min, max and sketch are those of the partials added up (the sketch bins by key, as the tiers
cascade), avg and p95 computed from them. Every change goes out as a non-final upsert.

Final: once every sender of the bucket's topic (each of its partitions in the topic catalogue, and any
other seen) has sent progress at or past the bucket's end. Each sender lists its progress after the partials
it has finalised, and the app delivers one call's outputs to each partition in that order and a batch's
outputs before it processes the next, so by then every sender's final partial is here. A partition that
never receives a record sends no progress, and the buckets of its topic stay non-final until it does (as
every partition's own buckets wait for its own watermark).

Crash safety (at-least-once input, a changelog that is a prefix of the writes in order):
- replayed partials and progress change nothing (latest per sender; progress only moves forward);
- a partial for a bucket already final here is a re-send of a final already merged (it came before the
  progress that closed the bucket): ignored while the final entry is kept, dropped once it is gone;
- a final entry keeps ``f``, the last offset of the batch that finalised it, until that offset is committed;
  on a resumed partition finals at or after the committed offset are emitted again;
- bucket entries are written before the senders' progress, so a restored progress never covers a bucket the
  restored state lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ddsketch.mapping import LogarithmicMapping

from bus.topics import BY_KEY
from streams.rollups.aggregate import Aggregate, bins_of
from streams.rollups.processor import PARTIALS_TOPIC, ROLLUP_RECORD, TIER_LETTER, TIER_OF
from streams.runtime.buckets import TIERS, bucket_end, iso, to_ms
from streams.runtime.processor import Output, PartitionBatch, Result
from streams.runtime.state import BatchState

__all__ = ["RollupMerger"]

log = logging.getLogger(__name__)

_PROGRESS = "~progress|"
"""State key prefix of a sender topic's progress: ``{partition: closed_before ms}``."""
_NEVER = -(2**62)
_BUCKETS_FIRST = tuple(f"{TIER_LETTER[tier]}|" for tier in TIERS)
"""The write order: bucket entries before the senders' progress (``_PROGRESS``, the rest)."""


@dataclass(slots=True)
class _Part:
    """A sender's latest partial of one bucket. Stored (state, changelog JSON) as ``[count, sum, min, max,
    final, watermark ms, relative accuracy, zero count, keys, counts]``, as it always was."""

    aggregate: Aggregate
    final: bool
    watermark: int
    accuracy: float

    @classmethod
    def of_rollup(cls, rollup: Mapping[str, Any]) -> _Part:
        sketch = rollup["sketch"]
        aggregate = Aggregate(
            int(rollup["count"]),
            float(rollup["sum"]),
            float(rollup["min"]),
            float(rollup["max"]),
            float(sketch["zero_count"]),
            bins_of([int(k) for k in sketch["keys"]], [float(c) for c in sketch["counts"]]),
        )
        accuracy = float(sketch["relative_accuracy"])
        return cls(aggregate, bool(rollup["final"]), _ms(rollup["watermark"]), accuracy)

    @classmethod
    def from_state(cls, stored: list[Any]) -> _Part:
        count, total, low, high, final, watermark, accuracy, zeros, keys, counts = stored
        aggregate = Aggregate(count, total, low, high, zeros, bins_of(keys, counts))
        return cls(aggregate, final, watermark, accuracy)

    def to_state(self) -> list[Any]:
        agg = self.aggregate
        return [
            agg.count,
            agg.sum,
            agg.min,
            agg.max,
            self.final,
            self.watermark,
            self.accuracy,
            agg.zeros,
            list(agg.bins),
            list(agg.bins.values()),
        ]

    def grows(self, old: _Part | None) -> bool:
        """Whether this partial is later than ``old`` in its sender's order (the module doc)."""
        return old is None or (self.aggregate.count, self.final) > (old.aggregate.count, old.final)


def _loaded(stored: Any) -> Any:
    """A stored entry as the merge works on it: a bucket's partials as :class:`_Part` (the senders'
    progress as it is); the stored entry itself is left as it was."""
    if "p" not in stored:
        return stored if type(stored) is not dict else dict(stored)
    entry = dict(stored)
    entry["p"] = {sender: _Part.from_state(part) for sender, part in stored["p"].items()}
    return entry


def _stored(entry: Any) -> Any:
    """The stored (JSON) form of a working entry (:func:`_loaded`)."""
    if type(entry) is not dict or "p" not in entry:
        return entry
    stored = dict(entry)
    stored["p"] = {sender: part.to_state() for sender, part in entry["p"].items()}
    return stored


class RollupMerger:
    """Merges the partials on ``streams.rollup-partials`` into Rollups (see the module doc)."""

    name = "rollup_merge"
    topics = (PARTIALS_TOPIC,)

    def __init__(self) -> None:
        self._mappings: dict[float, LogarithmicMapping] = {}

    def process(self, batch: PartitionBatch, state: MutableMapping[str, Any]) -> Result:
        result = Result()
        if not batch.inputs:
            return result
        work = BatchState(state, order=_BUCKETS_FIRST, load=_loaded, dump=_stored)
        progress: dict[str, dict[str, int]] = {}
        moved: set[str] = set()
        changed: set[str] = set()
        for record in batch.inputs:
            value = record.value
            topic, sender = value["sender_topic"], str(value["sender_partition"])
            rollup = value.get("rollup")
            if rollup is None:
                closed = value.get("closed_before")
                if closed is None:
                    continue  # neither a partial nor progress: carries nothing to merge
                known = self._progress(work, progress, topic)
                ms = _ms(closed)
                if ms > known.get(sender, _NEVER):
                    known[sender] = ms
                    moved.add(topic)
                continue
            tier, start = rollup["tier"], _ms(rollup["bucket_start"])
            key = f"{TIER_LETTER[tier]}|{start}|{rollup['series']}"
            entry = work.get(key)
            if entry is None:
                closed_before = self._closed_before(topic, self._progress(work, progress, topic))
                if closed_before is not None and bucket_end(tier, start) <= closed_before:
                    continue  # a re-sent final of a bucket merged, published and dropped here
                entry = {
                    "t": topic,
                    "m": rollup["metric"],
                    "l": dict(rollup["labels"]),
                    "s": rollup["source"],
                    "w": _NEVER,
                    "p": {},
                }
            if "f" in entry:
                continue  # final here: a sender re-sent what the final already holds
            part = _Part.of_rollup(rollup)
            if part.grows(entry["p"].get(sender)):
                entry["p"][sender] = part
                entry["w"] = max(entry["w"], part.watermark)
                work.put(key, entry)
                changed.add(key)

        finalised: set[str] = set()
        if batch.resumed or moved:
            self._close(batch, work, progress, changed, finalised, result.outputs)
        for key in changed:
            if key not in finalised and "f" not in work.get(key):
                self._emit(result.outputs, key, work.get(key), final=False)
        # Buckets before progress (_BUCKETS_FIRST): a restored progress never covers a bucket the restored
        # state lacks.
        for topic in moved:
            work.put(_PROGRESS + topic, progress[topic])
        work.flush()
        return result

    # -- closing --------------------------------------------------------------------------------------------

    def _close(
        self,
        batch: PartitionBatch,
        work: BatchState,
        progress: dict[str, dict[str, int]],
        changed: set[str],
        finalised: set[str],
        outputs: list[Output],
    ) -> None:
        """Finalise every bucket all its senders have closed; on a resumed partition emit again the finals
        that may not have been flushed; drop finals whose offset is committed."""
        committed = batch.committed_offset
        unproven = committed if committed is not None else -1
        closed: dict[str, int | None] = {}
        deletes: list[str] = []
        for key in work.live_keys():
            if key.startswith(_PROGRESS):
                continue
            entry = work.get(key)
            final_offset = entry.get("f")
            if final_offset is not None:
                if batch.resumed and final_offset >= unproven:
                    self._emit(outputs, key, entry, final=True)
                if committed is not None and final_offset < committed and key not in changed:
                    deletes.append(key)
                continue
            topic = entry["t"]
            if topic not in closed:
                closed[topic] = self._closed_before(topic, self._progress(work, progress, topic))
            closed_before = closed[topic]
            letter, start, _ = key.split("|", 2)
            if closed_before is None or bucket_end(TIER_OF[letter], int(start)) > closed_before:
                continue
            if not all(part.final for part in entry["p"].values()):
                # Cannot happen while senders list their finals before their progress: say so if it does.
                log.warning("merged rollup final with a partial that is not", extra={"key": key})
            entry["f"] = batch.last_offset
            work.put(key, entry)
            finalised.add(key)
            self._emit(outputs, key, entry, final=True)
        for key in deletes:
            work.delete(key)

    @staticmethod
    def _progress(work: BatchState, progress: dict[str, dict[str, int]], topic: str) -> dict[str, int]:
        """The progress of ``topic``'s senders (a copy of the state's, written back by ``process``)."""
        found = progress.get(topic)
        if found is None:
            found = progress[topic] = dict(work.get(_PROGRESS + topic) or {})
        return found

    @staticmethod
    def _closed_before(topic: str, known: Mapping[str, int]) -> int | None:
        """The instant every sender of ``topic`` (each partition the topic catalogue gives it, and any other
        that sent progress) has closed its buckets up to; None while one of them has not told."""
        spec = BY_KEY.get(topic)
        if not known or (spec is not None and any(str(p) not in known for p in range(spec.partitions))):
            return None
        return min(known.values())

    # -- output ---------------------------------------------------------------------------------------------

    def _mapping(self, accuracy: float) -> LogarithmicMapping:
        found = self._mappings.get(accuracy)
        if found is None:
            found = self._mappings[accuracy] = LogarithmicMapping(accuracy)
        return found

    def _emit(self, outputs: list[Output], key: str, entry: dict[str, Any], *, final: bool) -> None:
        letter, start_text, series = key.split("|", 2)
        tier, start = TIER_OF[letter], int(start_text)
        parts = [entry["p"][sender] for sender in sorted(entry["p"], key=int)]
        first = parts[0]
        accuracy = first.accuracy
        mapping = self._mapping(accuracy)
        merged = Aggregate(0, 0.0, first.aggregate.min, first.aggregate.max, 0.0, {})
        for part in parts:  # in partition order, so the sum does not depend on arrival order
            if part.accuracy == accuracy:
                merged.merge(part.aggregate)
            else:
                # Bins of another width do not line up: re-bin each at its representative value (senders
                # of one app share one accuracy, so this is for a mixed deployment only).
                other = self._mapping(part.accuracy)
                merged.merge(part.aggregate, lambda key, other=other: mapping.key(other.value(key)))
        keys, counts, p95 = merged.sketch_and_p95(mapping)
        count, total, low, high, zeros = merged.count, merged.sum, merged.min, merged.max, merged.zeros
        value = {
            "series": series,
            "metric": entry["m"],
            "labels": entry["l"],
            "tier": tier,
            "bucket_start": start,
            "bucket_end": bucket_end(tier, start),
            "count": int(count),
            "min": float(low),
            "max": float(high),
            "sum": float(total),
            "avg": float(total) / count if count else 0.0,
            "p95": p95,
            "sketch": {"relative_accuracy": accuracy, "zero_count": zeros, "keys": keys, "counts": counts},
            "final": final,
            "watermark": entry["w"],
            "source": entry["s"],
        }
        outputs.append(Output("rollups", f"{series}|{tier}|{iso(start)}", ROLLUP_RECORD, value))


def _ms(moment: datetime | int) -> int:
    """A timestamp as decoded (datetime) or as a processor built it (milliseconds)."""
    return moment if isinstance(moment, int) else to_ms(moment)
