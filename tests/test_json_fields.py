"""Reading one top-level field of a JSON object without parsing it whole
(rayllm_auth.json_fields). The oracle is json.loads: on any object, written any way
json.dumps writes, the answer is json.loads(body)[name], or FieldNotFound when it has none."""

import json
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from rayllm_auth.json_fields import (FIRST_FIELD_WINDOW, MAX_CANDIDATES, FieldNotFound,
                                     first_field, last_field)

# Strings and keys that look like the keys searched for, from inside a string or a nested
# object: the reader must never take them for the object's own.
LOOKALIKES = ['"usage":', ',"usage":{"prompt_tokens":1}}', '{"model":"x"', 'x"usage', "usage\\",
              ',"model":', "\\", "é", '"usage" :', "}"]
keys = st.sampled_from(["usage", "model", "a", "b", *LOOKALIKES]) | st.text(max_size=6)
leaves = (st.none() | st.booleans() | st.integers() | st.sampled_from(LOOKALIKES)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=24)
objects = st.dictionaries(keys, values, max_size=7)
writings = st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2},
                            {"ensure_ascii": False}, {"separators": (" , ", " : ")}])


@settings(max_examples=400)
@given(objects, writings)
def test_a_field_reads_as_json_loads_reads_it(document, writing):
    body = json.dumps(document, **writing).encode()
    for name, read in (("usage", last_field), ("model", first_field)):
        if name in document:
            assert read(body, name) == document[name]
        else:
            with pytest.raises(FieldNotFound):
                read(body, name)


@pytest.mark.parametrize("body", [b"", b"[]", b'[{"usage": 1}]', b'"usage"', b"{not json",
                                  b'{"a": {"usage": 1}}', b'{"a": [{"model": "m"}]}',
                                  b'{"usage": 1', b"\xff\xfe"])
def test_what_is_not_an_objects_own_field_is_not_found(body):
    # (first_field does not read past its value: '{"model": "m"' gives "m"; bodies are the
    # app's own JSON, and a body cut short has no usage to count)
    for name, read in (("usage", last_field), ("model", first_field)):
        with pytest.raises(FieldNotFound):
            read(body, name)


def test_a_large_response_is_read_without_parsing_it_whole():
    # An embeddings response of several MiB: parsing it whole takes several times its size in
    # memory (and seconds of the event loop at hundreds of MiB); reading its two fields must
    # not (review 12, finding 3).
    document = {"id": "x", "object": "list", "created": 1, "model": "m",
                "data": [{"index": i, "embedding": [0.123456789] * 1000} for i in range(400)],
                "usage": {"prompt_tokens": 400, "total_tokens": 400}}
    body = json.dumps(document).encode()
    assert len(body) > 5_000_000
    tracemalloc.start()
    try:
        assert last_field(body, "usage") == document["usage"]
        assert first_field(body, "model") == "m"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FIRST_FIELD_WINDOW * 8  # json.loads(body) takes more than 20 MB here


def test_a_search_stops_after_so_many_nested_keys():
    # Each nested key of the name costs a parse of what follows it: a body with more of them
    # than MAX_CANDIDATES after its own is not read (not counted) rather than read slowly.
    nested = {f"n{i}": {"usage": i} for i in range(MAX_CANDIDATES + 1)}
    body = json.dumps({"usage": {"prompt_tokens": 1}, **nested}).encode()
    with pytest.raises(FieldNotFound):
        last_field(body, "usage")
    fewer = {f"n{i}": {"usage": i} for i in range(MAX_CANDIDATES - 1)}
    assert last_field(json.dumps({"usage": 1, **fewer}).encode(), "usage") == 1
