"""Avro binary bodies written by Python code generated once per record schema.

fastavro's writer walks the schema for every value (a dispatch per field and per array item); the
function compiled here knows the schema already, so a Rollup costs a few dictionary lookups, one
``struct`` call per run of doubles and one ``bytes.join``. It writes exactly fastavro's bytes, and for
every value it is not sure about (a missing or unknown field, an unexpected type, a naive datetime, an
out-of-range number) it raises instead, so that the caller writes that value with fastavro, whose result
or error then stays what it always was.

Everywhere, ints must be ints (not bools, floats or numpy ints) and records and maps dicts (not
subclasses). Outside unions a value may otherwise be what fastavro's writer converts the same way (an int
for a double, 0 or 1 for a boolean, a tuple for an array, a str subclass); inside a union fastavro first
picks the branch with its validator, so there only the exact Python types that validator accepts are
written (and never a ``tuple``, which fastavro reads as ``(type name, value)``)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["NotHandled", "compile_writer"]


class NotHandled(ValueError):
    """A compiled writer leaves this value to fastavro."""


class _Unsupported(Exception):
    """The schema uses something the compiler does not generate code for."""


# -- ints ------------------------------------------------------------------------------------------------
# Precomputed encodings: most ints (counts, lengths, sketch keys, union indexes) are one lookup.
_U14 = tuple(bytes((n,)) for n in range(0x80)) + tuple(
    bytes((low | 0x80, high)) for high in range(1, 0x80) for low in range(0x80)
)  # the unsigned varint of n < 2**14
_C14 = tuple(bytes((low | 0x80, high | 0x80)) for high in range(0x80) for low in range(0x80))  # more follow
_LEN = _U14[::2]  # a length or count n >= 0 is the long n: zigzag 2n
_SMALL = dict(zip(range(0x2000), _LEN, strict=True))  # the long i for -2**13 <= i < 2**13 ...
_SMALL.update(zip(range(-1, -0x2001, -1), _U14[1::2], strict=True))  # ... negative i: zigzag -2i-1, odd
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
# Recently written large longs and short strings: a bucket start, a sample time, a host or label value
# repeats across many records. Bounded by clearing; a clear racing a lookup only costs a recomputation.
_BIG: dict[int, bytes] = {}
_TEXT: dict[str, bytes] = {}
_CACHE_MAX = 8192
_TEXT_MAX_CHARS = 128


def _uvarint(n: int) -> bytes:
    if n < 0x4000:
        return _U14[n]
    parts = []
    while n >= 0x4000:
        parts.append(_C14[n & 0x3FFF])
        n >>= 14
    parts.append(_U14[n])
    return b"".join(parts)


def _remember(cache: dict[Any, bytes], key: Any, encoded: bytes) -> None:
    """Keep an encoding in a bounded cache, emptied when full."""
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = encoded


def _length(n: int) -> bytes:
    return _LEN[n] if n < 0x2000 else _uvarint(n << 1)


def _long(x: Any) -> bytes:
    # Only ints: a dictionary lookup also matches 1.0, True or 1+0j, which fastavro converts or refuses.
    if x.__class__ is not int:
        raise NotHandled(f"not an int: {x!r:.40}")
    return _SMALL.get(x) or _BIG.get(x) or _new_long(x)


def _new_long(x: int) -> bytes:
    if 0x8000000 <= x < 0x20000000000:  # 6 bytes, the zigzag 2x in 3 chunks: epoch ms 1970-01-02 to 2039
        b = _C14[(x << 1) & 0x3FFF] + _C14[(x >> 13) & 0x3FFF] + _U14[x >> 27]
    elif _LONG_MIN <= x <= _LONG_MAX:
        b = _uvarint((x << 1) ^ (x >> 63))
    else:
        raise OverflowError(f"{x} does not fit a long")
    _remember(_BIG, x, b)
    return b


def _int(x: Any) -> bytes:
    if x.__class__ is not int:
        raise NotHandled(f"not an int: {x!r:.40}")
    b = _SMALL.get(x)
    if b is None:
        # fastavro writes any 64-bit value to an Avro int unchecked; refusing keeps such values its problem.
        if not _INT_MIN <= x <= _INT_MAX:
            raise OverflowError(f"{x} does not fit an int")
        b = _BIG.get(x) or _new_long(x)
    return b


# -- timestamps ------------------------------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLI = timedelta(milliseconds=1)
_MICRO = timedelta(microseconds=1)


def _since_epoch(x: Any, unit: timedelta) -> int:
    if x.__class__ is not datetime:  # bool, float: fastavro converts or refuses them, not us
        raise NotHandled(f"not an int or datetime: {x!r:.40}")
    if x.tzinfo is None:  # fastavro reads a naive datetime in the local zone (mktime); left to it
        raise NotHandled("naive datetime")
    return (x - _EPOCH) // unit  # floor, as fastavro's days/seconds/microseconds arithmetic


def _timestamp_millis(x: Any) -> bytes:
    if x.__class__ is not int:
        x = _since_epoch(x, _MILLI)
    return _BIG.get(x) or _SMALL.get(x) or _new_long(x)


def _timestamp_micros(x: Any) -> bytes:
    if x.__class__ is not int:
        x = _since_epoch(x, _MICRO)
    return _BIG.get(x) or _SMALL.get(x) or _new_long(x)


# -- strings and bytes -----------------------------------------------------------------------------------


def _text(x: Any) -> bytes:
    b = x.encode()  # what fastavro calls, whatever x is
    b = _length(len(b)) + b
    if x.__class__ is str and len(x) <= _TEXT_MAX_CHARS:
        _remember(_TEXT, x, b)
    return b


def _string(x: Any) -> bytes:
    if x.__class__ is not str:
        raise NotHandled(f"not a str: {x!r:.40}")
    return _TEXT.get(x) or _text(x)


def _bytes(x: Any) -> bytes:
    if x.__class__ is not bytes and x.__class__ is not bytearray:
        raise NotHandled(f"not bytes: {x!r:.40}")
    return _length(len(x)) + x


def _fixed(x: Any, size: int) -> bytes:
    if x.__class__ is not bytes or len(x) != size:
        raise NotHandled(f"not {size} bytes: {x!r:.40}")
    return x


# -- other scalars ---------------------------------------------------------------------------------------
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_INDEX_DOUBLE = struct.Struct("<Bd").pack  # a union index below 64 and a double, in one call
_BOOL = {False: b"\x00", True: b"\x01"}  # 0, 1, 0.0 and 1.0 hit too, and fastavro writes their truth


def _real(x: Any) -> Any:
    # What fastavro's union validator takes as a float or double; bool is an int but not a number to it.
    if x.__class__ is float or x.__class__ is int:
        return x
    raise NotHandled(f"not a float or int: {x!r:.40}")


def _boolean(x: Any) -> bytes:
    if x is True:
        return b"\x01"
    if x is False:
        return b"\x00"
    raise NotHandled(f"not a bool: {x!r:.40}")


def _refuse(what: str) -> Any:
    raise NotHandled(what)


# -- arrays and maps outside unions ----------------------------------------------------------------------
_PACKERS: dict[str, Callable[..., bytes]] = {}
_INT_ONLY = frozenset({int})


def _packed(code: str, items: list[Any] | tuple[Any, ...]) -> bytes:
    key = f"<{len(items)}{code}"
    pack = _PACKERS.get(key)
    if pack is None:
        pack = struct.Struct(key).pack
        if len(_PACKERS) < 1024:  # struct's own cache holds only 100 formats
            _PACKERS[key] = pack
    return pack(*items)


def _doubles(items: list[Any] | tuple[Any, ...]) -> bytes:
    return _packed("d", items)


def _floats(items: list[Any] | tuple[Any, ...]) -> bytes:
    return _packed("f", items)


def _longs(items: list[Any] | tuple[Any, ...]) -> bytes:
    if _INT_ONLY.issuperset(map(type, items)):
        try:
            return b"".join(map(_SMALL.__getitem__, items))
        except KeyError:
            pass
    return b"".join([_long(x) for x in items])


def _ints(items: list[Any] | tuple[Any, ...]) -> bytes:
    if _INT_ONLY.issuperset(map(type, items)):
        try:
            return b"".join(map(_SMALL.__getitem__, items))
        except KeyError:
            pass
    return b"".join([_int(x) for x in items])


def _texts(items: Iterable[Any]) -> bytes:
    return b"".join([_TEXT.get(x) or _text(x) for x in items])


def _known_texts(items: list[Any] | tuple[Any, ...]) -> bytes:
    try:
        return b"".join(map(_TEXT.__getitem__, items))
    except (KeyError, TypeError):
        return _texts(items)


def _array(a: Any, items: Callable[[Any], bytes]) -> bytes:
    # fastavro takes any iterable for an array; other than a list or tuple, the order or the type may differ.
    if a.__class__ is not list and a.__class__ is not tuple:
        raise NotHandled(f"not a list: {a!r:.40}")
    n = len(a)
    if not n:
        return b"\x00"
    return b"".join((_LEN[n] if n < 0x2000 else _uvarint(n << 1), items(a), b"\x00"))


_ITEMS = {
    "double": "_doubles",
    "float": "_floats",
    "long": "_longs",
    "int": "_ints",
    "string": "_known_texts",
}
_HELPERS: dict[str, Any] = {
    "NotHandled": NotHandled,
    "_BIG": _BIG,
    "_BOOL": _BOOL,
    "_DOUBLE": _DOUBLE,
    "_FLOAT": _FLOAT,
    "_INDEX_DOUBLE": _INDEX_DOUBLE,
    "_LEN": _LEN,
    "_SMALL": _SMALL,
    "_TEXT": _TEXT,
    "_array": _array,
    "_boolean": _boolean,
    "_bytes": _bytes,
    "_dict": dict,
    "_doubles": _doubles,
    "_fixed": _fixed,
    "_float": float,
    "_floats": _floats,
    "_int": _int,
    "_int_class": int,
    "_ints": _ints,
    "_length": _length,
    "_list": list,
    "_long": _long,
    "_longs": _longs,
    "_real": _real,
    "_refuse": _refuse,
    "_string": _string,
    "_text": _text,
    "_known_texts": _known_texts,
    "_timestamp_micros": _timestamp_micros,
    "_timestamp_millis": _timestamp_millis,
    "_tuple": tuple,
}

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class _Compiler:
    """Generates one function per (named record, strictness) and per array or map type that needs a loop,
    as source text, and for everything else an expression; every expression evaluates to bytes."""

    def __init__(self, named: Mapping[str, Any]) -> None:
        self.named = dict(named)
        self.namespace: dict[str, Any] = dict(_HELPERS)
        self.functions: list[str] = []
        self.records: dict[tuple[str, bool], str] = {}
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.fresh(prefix)
        self.namespace[name] = value
        return name

    # parts() and the methods it calls return expressions whose bytes, in order, encode the value of `x`,
    # an expression that they evaluate only once.

    def parts(self, schema: Any, x: str, strict: bool) -> list[str]:
        if isinstance(schema, list):
            return [self.union(schema, x)]
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return [self.primitive(schema, x, strict)]
            if schema not in self.named:
                raise _Unsupported(f"unknown type {schema}")
            return self.parts(self.named[schema], x, strict)
        if not isinstance(schema, dict):
            raise _Unsupported(f"schema {schema!r:.60}")
        kind = schema.get("type")
        logical = schema.get("logicalType")
        if logical is not None:
            return [self.logical(kind, logical, x)]
        if kind in _PRIMITIVES:
            return [self.primitive(kind, x, strict)]
        if kind == "record":
            return [f"{self.record(schema, strict)}({x})"]
        if kind == "enum":
            self.named.setdefault(schema["name"], schema)
            symbols = {s: _length(i) for i, s in enumerate(schema["symbols"])}  # written as the long i
            return [f"{self.constant('_enum', symbols)}[{x}]"]
        if kind == "fixed":
            self.named.setdefault(schema["name"], schema)
            return [f"_fixed({x}, {int(schema['size'])})"]
        if kind == "array":
            return [self.array(schema["items"], x, strict)]
        if kind == "map":
            return [self.map(schema["values"], x, strict)]
        raise _Unsupported(f"type {kind!r}")

    def expression(self, schema: Any, x: str, strict: bool) -> str:
        return " + ".join(self.parts(schema, x, strict))

    def primitive(self, kind: str, x: str, strict: bool) -> str:
        if kind == "null":
            return f"(b'' if {x} is None else _refuse('not None'))"
        if kind == "boolean":
            return f"_boolean({x})" if strict else f"_BOOL[{x}]"
        if kind in ("long", "int"):
            t = self.fresh("t")
            return f"((_SMALL.get({t}) if ({t} := {x}).__class__ is _int_class else None) or _{kind}({t}))"
        if kind in ("double", "float"):
            pack = "_DOUBLE" if kind == "double" else "_FLOAT"
            return f"{pack}(_real({x}))" if strict else f"{pack}({x})"
        if kind == "bytes":
            return f"_bytes({x})"
        if strict:  # string
            return f"_string({x})"
        t = self.fresh("t")
        return f"(_TEXT.get({t} := {x}) or _text({t}))"

    def logical(self, kind: Any, logical: str, x: str) -> str:
        if kind != "long" or logical not in ("timestamp-millis", "timestamp-micros"):
            raise _Unsupported(f"logical type {logical} of {kind}")
        function = "_timestamp_" + logical.removeprefix("timestamp-")
        t = self.fresh("t")
        return f"((_BIG.get({t}) if ({t} := {x}).__class__ is _int_class else None) or {function}({t}))"

    def union(self, branches: list[Any], x: str) -> str:
        types = [
            b if isinstance(b, str) else b.get("type") if isinstance(b, dict) else None for b in branches
        ]
        if len(branches) != 2 or types.count("null") != 1:
            raise _Unsupported(f"union {types}")
        null = types.index("null")
        other, u = branches[1 - null], self.fresh("u")
        # fastavro picks the branch with its validator: only the types it accepts, checked all the way down.
        if other == "double":
            is_real = f"{u}.__class__ is _float or {u}.__class__ is _int_class"
            value = f"(_INDEX_DOUBLE({2 * (1 - null)}, {u}) if {is_real} else _refuse('not a double'))"
        else:
            value = f"{_length(1 - null)!r} + {self.expression(other, u, strict=True)}"
        return f"({_length(null)!r} if ({u} := {x}) is None else {value})"

    def record(self, schema: dict[str, Any], strict: bool) -> str:
        name = schema["name"]
        self.named.setdefault(name, schema)
        key = (name, strict)
        if key in self.records:
            return self.records[key]
        function = self.records[key] = self.fresh("_record")
        fields = schema["fields"]
        parts: list[str] = []
        doubles: list[str] = []  # a run of double fields: one struct call
        for field in fields:
            value = f"v[{field['name']!r}]"
            if field["type"] == "double" and not strict:
                doubles.append(value)
                continue
            if doubles:
                parts.append(self.pack_doubles(doubles))
                doubles = []
            parts.extend(self.parts(field["type"], value, strict))
        if doubles:
            parts.append(self.pack_doubles(doubles))
        self.functions.append(
            f"def {function}(v):\n"
            f"    if v.__class__ is not _dict or len(v) != {len(fields)}:\n"
            f"        raise NotHandled({'fields of ' + name + ' differ'!r})\n"
            f"    return b''.join(({', '.join(parts)},))\n"
        )
        return function

    def pack_doubles(self, values: list[str]) -> str:
        pack = self.constant("_pack", struct.Struct(f"<{len(values)}d").pack)
        return f"{pack}({', '.join(values)})"

    def array(self, items: Any, x: str, strict: bool) -> str:
        if not strict and isinstance(items, str) and items in _ITEMS:
            return f"_array({x}, {_ITEMS[items]})"
        # Inside a union a tuple would be fastavro's (type name, value).
        refused = "a.__class__ is not _list" + ("" if strict else " and a.__class__ is not _tuple")
        return self.loop(x, "a", refused, "for i in a", self.parts(items, "i", strict))

    def map(self, values: Any, x: str, strict: bool) -> str:
        key = [self.primitive("string", "k", strict)]
        return self.loop(
            x, "m", "m.__class__ is not _dict", "for k, w in m.items()", key + self.parts(values, "w", strict)
        )

    def loop(self, x: str, arg: str, refused: str, header: str, parts: list[str]) -> str:
        function = self.fresh("_loop")
        add = f"out.append({parts[0]})" if len(parts) == 1 else f"out += ({', '.join(parts)})"
        self.functions.append(
            f"def {function}({arg}):\n"
            f"    if {refused}:\n"
            f"        raise NotHandled('not a list or dict of the schema')\n"
            f"    if not {arg}:\n"
            f"        return b'\\x00'\n"
            f"    out = [_length(len({arg}))]\n"
            f"    {header}:\n"
            f"        {add}\n"
            f"    out.append(b'\\x00')\n"
            f"    return b''.join(out)\n"
        )
        return f"{function}({x})"


def compile_writer(parsed_schema: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bytes] | None:
    """A function that returns the Avro binary body of a value of this record schema (as parsed by
    ``fastavro.parse_schema``), or raises for a value it leaves to fastavro (any exception: NotHandled,
    KeyError, TypeError, OverflowError...). None when the schema uses what it does not generate: unions
    other than null and one type, logical types other than timestamp-millis/-micros on a long."""
    if not isinstance(parsed_schema, Mapping) or parsed_schema.get("type") != "record":
        return None
    compiler = _Compiler(parsed_schema.get("__named_schemas", {}))
    try:
        top = compiler.record(dict(parsed_schema), strict=False)
    except (_Unsupported, KeyError, TypeError, ValueError, AttributeError):
        return None
    source = "\n".join(compiler.functions)
    exec(compile(source, f"<avro writer for {parsed_schema['name']}>", "exec"), compiler.namespace)
    writer = compiler.namespace[top]
    writer.__doc__ = f"Avro body of a {parsed_schema['name']}, generated by bus.avro_writer."
    return writer
