"""relay.wire's JSON check gives the same verdicts with orjson and without it.

A backend installed as relay-backend (no orjson) validates ``data`` with a pure-Python
walker; nodes use orjson. Both must refuse exactly the same values, or a publish that
one side accepts would be refused by the other.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.wire import MAX_DATA_DEPTH, _check_plain, check_json_data


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3
    HUGE = 2**64


class Mode(str, enum.Enum):  # noqa: UP042 - the mixin form, as older code writes it
    FAST = "fast"


class Flag(enum.IntFlag):
    A = 1


class Name(enum.StrEnum):
    ALICE = "alice"


class MyStr(str):
    pass


class MyInt(int):
    pass


class MyDict(dict[str, Any]):
    pass


@dataclasses.dataclass
class Point:
    x: int


ODD = [
    Color.RED,
    Level.HIGH,
    Level.HUGE,
    Mode.FAST,
    Flag.A,
    Name.ALICE,
    MyStr("s"),
    MyInt(1),
    MyDict(a=1),
    Point(1),
    collections.OrderedDict(a=1),
    collections.namedtuple("Pair", "a b")(1, 2),
    datetime.datetime(2026, 12, 4),
    datetime.date(2026, 12, 4),
    uuid.UUID(int=7),
    decimal.Decimal("1.5"),
    b"bytes",
    bytearray(b"x"),
    {1, 2},
    frozenset(),
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    float("nan"),
    float("inf"),
    {1: "int key"},
    {Mode.FAST: "enum key"},
    {None: 1},
    object(),
]


def accepted(check: Callable[[Any], None], data: Any) -> bool:
    """``check`` (the node's orjson check or relay-backend's walker), then MessagePack."""
    try:
        check(data)
        msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def accepted_by_orjson_and_msgpack(data: Any) -> bool:
    return accepted(check_json_data, data)


def accepted_without_orjson(data: Any) -> bool:
    return accepted(_check_plain, data)


def test_wire_json_check_uses_orjson_where_installed() -> None:
    """In the server's environment the check is orjson's, not the walker."""
    assert check_json_data is not _check_plain
    assert orjson.__version__


@pytest.mark.parametrize("value", ODD, ids=lambda v: type(v).__name__)
def test_wire_json_check_same_verdict_on_odd_values(value: Any) -> None:
    """Enums, subclasses, dataclasses, dates, UUIDs, bytes, big ints, odd keys: same verdict,
    alone and inside a list and a dict."""
    for data in (value, [1, value], {"k": value}):
        assert accepted_without_orjson(data) == accepted_by_orjson_and_msgpack(data), data


@pytest.mark.parametrize("depth", [MAX_DATA_DEPTH - 1, MAX_DATA_DEPTH, MAX_DATA_DEPTH + 1])
def test_wire_json_check_same_verdict_at_the_nesting_limit(depth: int) -> None:
    """Lists and dicts nested up to the limit pass both ways; one more fails both ways."""
    as_list: Any = []
    as_dict: Any = {}
    for _ in range(depth - 1):
        as_list, as_dict = [as_list], {"a": as_dict}
    for data in (as_list, as_dict):
        verdict = accepted_by_orjson_and_msgpack(data)
        assert accepted_without_orjson(data) == verdict
        assert verdict == (depth <= MAX_DATA_DEPTH)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=3),
    st.sampled_from(ODD),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.dictionaries(st.one_of(st.integers(), st.text(max_size=2)), inner, max_size=2),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_wire_json_check_same_verdict_on_random_data(data: Any) -> None:
    """Random nested data: the pure walker accepts exactly what orjson and msgpack accept."""
    assert accepted_without_orjson(data) == accepted_by_orjson_and_msgpack(data)
