"""streams/runtime/state.py: a processor's batch state writes each key once, in the order that keeps any
changelog prefix a state to continue from (named prefixes first, deletes last), and reads state written when
the replay offset was still called ``o``."""

from __future__ import annotations

import copy
import json
from typing import Any

from streams.runtime.state import OFFSET, BatchState, copy_entry, offset_of


class Changelog(dict[str, Any]):
    """A dict that records every write and delete in order, as a changelog carries them."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.log: list[tuple[str, Any]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.log.append((key, json.loads(json.dumps(value))))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.log.append((key, None))


def test_each_key_is_written_once_named_prefixes_first_then_by_key_then_deletes() -> None:
    state = Changelog({"h|1|a": {"v": 0}, "stale": {"v": 9}})
    work = BatchState(state, order=("y|", "d|", "h|"))
    for value in range(3):  # put again and again: one write
        work.put("h|2|a", {"v": value})
    work.put("zz", {"v": 1})
    work.put("d|0|a", {"v": 1})
    work.put("h|1|a", {"v": 1})
    work.put("y|0|a", {"v": 1})
    work.delete("stale")
    assert work.written("h|2|a") and not work.written("stale")
    assert work.get("stale") is None and work.get("h|2|a") == {"v": 2}
    assert state.log == []  # nothing before flush
    work.flush()
    assert [key for key, _ in state.log] == ["y|0|a", "d|0|a", "h|1|a", "h|2|a", "zz", "stale"]
    assert state.log[3] == ("h|2|a", {"v": 2}) and state.log[-1] == ("stale", None)


def test_a_put_after_a_delete_writes_and_a_delete_after_a_put_deletes() -> None:
    state = Changelog({"a": {"v": 0}, "b": {"v": 0}})
    work = BatchState(state)
    work.delete("a")
    work.put("a", {"v": 1})
    work.put("b", {"v": 1})
    work.delete("b")
    assert work.live_keys() == ["a"]
    work.flush()
    assert state.log == [("a", {"v": 1}), ("b", None)]
    assert dict(state) == {"a": {"v": 1}}


def test_an_entry_is_read_once_through_load() -> None:
    state = {"k": {"n": 1}}
    loads: list[Any] = []

    def load(value: dict[str, Any]) -> dict[str, Any]:
        loads.append(value)
        return dict(value)

    work = BatchState(state, load=load)
    first = work.get("k")
    first["n"] = 2  # a change not put never reaches the store
    assert work.get("k") is first and len(loads) == 1
    assert work.get("missing") is None
    work.flush()
    assert state == {"k": {"n": 1}}


def test_state_written_with_the_old_offset_name_still_loads() -> None:
    """Rollup entries and anomaly findings kept the replay offset as ``o`` before it had one name."""
    state = {"h|0|a": {"o": 41, "s": {}}, "new": {OFFSET: 7}}
    work = BatchState(state)
    assert work.get("h|0|a")[OFFSET] == 41 and "o" not in work.get("h|0|a")
    assert work.get("new") == {OFFSET: 7}
    assert offset_of({"o": 3}) == 3 and offset_of({OFFSET: 4}) == 4 and offset_of({}) == -1


def test_a_working_type_is_stored_through_dump() -> None:
    """A processor that works on its own types (streams/rollups/aggregate.py) gets them from ``load`` and
    stores their JSON form through ``dump``; the stored value is not changed by the working copy."""
    state = Changelog({"k": {"n": [1, 2]}})
    work = BatchState(
        state,
        load=lambda stored: {"n": tuple(stored["n"])},
        dump=lambda value: {"n": list(value["n"])},
    )
    entry = work.get("k")
    assert entry == {"n": (1, 2)}
    entry["n"] = (*entry["n"], 3)
    assert state["k"] == {"n": [1, 2]}
    work.put("k", entry)
    work.flush()
    assert state.log == [("k", {"n": [1, 2, 3]})] and state["k"] == {"n": [1, 2, 3]}


def test_copy_entry_equals_deepcopy_and_shares_nothing_mutable() -> None:
    entry = {
        "offset": 7,
        "anchors": {"idle": [3, 41.5, 30.0], "busy": [0, 0.0, 0.0]},
        "alerts": {"memory_vs_job": {"expected": 1.5e9, "since": 1_700_000_000_000}},
        "job": [101, 202],
        "energy_last": [1_700_000_000_000, None, 250.0],
        "label": "GPU-0",
        "pair": (1, "a"),
    }
    copied = copy_entry(entry)
    assert copied == copy.deepcopy(entry)
    copied["anchors"]["idle"][0] += 1
    copied["alerts"]["memory_vs_job"]["since"] = 0
    copied["job"].append(303)
    assert entry["anchors"]["idle"][0] == 3
    assert entry["alerts"]["memory_vs_job"]["since"] == 1_700_000_000_000
    assert entry["job"] == [101, 202]
