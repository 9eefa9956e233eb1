"""A partition batch's records as columns, for processors that fold many samples at once.

The app hands a processor :class:`Columns` (``PartitionBatch.columns``) when every record of the batch was
read natively by ``bus.frames`` and passed validation; then ``PartitionBatch.inputs`` is a
:class:`LazyInputs` that builds its per-record dicts only if some processor asks for them. A processor that
reads the columns must give the same state and outputs as its per-record path over ``inputs``: the columns
hold exactly the values ``Codec.decode`` returns, one row per record, in offset order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import polars as pl

from bus.frames import Frame, python_values
from streams.runtime.processor import Input

__all__ = ["Columns", "LazyInputs"]


class Columns:
    """Row ``i`` is the record at ``offsets[i]`` of one topic partition; every record has an event time."""

    __slots__ = ("_event_ms", "_lists", "_numbers", "frame", "memo", "offsets", "record_name")

    def __init__(self, record_name: str, frame: pl.DataFrame, offsets: list[int]) -> None:
        if frame.height != len(offsets):
            raise ValueError(f"{frame.height} rows for {len(offsets)} offsets")
        self.record_name = record_name
        self.frame = frame
        self.offsets = offsets
        self._event_ms: list[int] | None = None
        self._lists: dict[str, list[Any]] = {}
        self._numbers: dict[str, np.ndarray] = {}
        self.memo: dict[Any, Any] = {}
        """What processors derive from the batch and share (e.g. ``SeriesIndex.by_metric``'s columns)."""

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def names(self) -> list[str]:
        return self.frame.columns

    @property
    def event_ms(self) -> list[int]:
        """Each record's event time (``time``) in epoch milliseconds."""
        if self._event_ms is None:
            self._event_ms = self.frame.get_column("time").dt.epoch("ms").to_list()
        return self._event_ms

    def values(self, name: str) -> list[Any]:
        """The field's values as Python objects (None for null), as ``Codec.decode`` gives them, except
        ``time``: epoch milliseconds (:attr:`event_ms`)."""
        found = self._lists.get(name)
        if found is None:
            found = self.event_ms if name == "time" else python_values(self.frame.get_column(name))
            self._lists[name] = found
        return found

    def numbers(self, name: str) -> np.ndarray:
        """A numeric field as float64, NaN for null (validation guarantees no NaN was sent)."""
        found = self._numbers.get(name)
        if found is None:
            column = self.frame.get_column(name)
            found = column.cast(pl.Float64).to_numpy()  # nulls come out as NaN
            self._numbers[name] = found
        return found

    def records(self) -> list[dict[str, Any]]:
        """Every row as the dict ``Codec.decode`` returns for it."""
        return Frame(self.record_name, self.frame).records()

    def record(self, row: int) -> dict[str, Any]:
        """One row as the dict ``Codec.decode`` returns for it."""
        return Frame(self.record_name, self.frame.slice(row, 1)).records()[0]

    def input(self, topic_key: str, partition: int, row: int) -> Input:
        """One row as the app's :class:`Input` (for ``Result.late``)."""
        value = self.record(row)
        return Input(topic_key, partition, self.offsets[row], self.record_name, value, value["time"])


class LazyInputs(Sequence[Input]):
    """``PartitionBatch.inputs`` of a batch that has :class:`Columns`: the per-record dicts are built on the
    first access that needs one, once for every processor of the batch."""

    __slots__ = ("_built", "columns", "partition", "topic_key")

    def __init__(self, topic_key: str, partition: int, columns: Columns) -> None:
        self.topic_key = topic_key
        self.partition = partition
        self.columns = columns
        self._built: list[Input] | None = None

    def __len__(self) -> int:
        return len(self.columns)

    def _inputs(self) -> list[Input]:
        if self._built is None:
            columns, key, partition = self.columns, self.topic_key, self.partition
            self._built = [
                Input(key, partition, offset, columns.record_name, value, value["time"])
                for offset, value in zip(columns.offsets, columns.records(), strict=True)
            ]
        return self._built

    @overload
    def __getitem__(self, index: int) -> Input: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Input]: ...

    def __getitem__(self, index: int | slice) -> Input | Sequence[Input]:
        return self._inputs()[index]

    def __iter__(self) -> Iterator[Input]:
        return iter(self._inputs())

    @property
    def built(self) -> bool:
        """Whether some processor asked for the per-record dicts (the bench and tests check it)."""
        return self._built is not None
