"""Reading one top-level field of a JSON object without parsing it whole
(rayllm_auth.json_fields). The oracle is json.loads: on any object, written any way
json.dumps writes, the answer is json.loads(body)[name], or FieldNotFound when it has none;
fast where engines put the field, exact everywhere."""

import json
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from rayllm_auth.json_fields import (FIRST_FIELD_WINDOW, MAX_LOOKS, FieldNotFound,
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


# No per-example deadline: under CI, beside the end-to-end clusters, one example took
# 268 ms against hypothesis's default 200 ms (a timing, not a property of the reader).
@settings(max_examples=400, deadline=None)
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


def test_many_look_alikes_cost_a_whole_parse_never_a_wrong_or_missing_field():
    # A prompt of "usage" tokens with prompt_logprobs (written after usage by vLLM) puts that
    # string many times after the real key; a JSON response must still be counted (review
    # 13, finding 1: they used up the search and the request went uncounted).
    logprobs = [{str(i): {"logprob": -1.0, "decoded_token": "usage"}} for i in range(200)]
    document = {"model": "m", "choices": [], "usage": {"prompt_tokens": 200},
                "prompt_logprobs": logprobs, "kv": {f"n{i}": {"usage": i} for i in range(80)}}
    for writing in ({}, {"separators": (",", ":")}, {"indent": 1}):
        body = json.dumps(document, **writing).encode()
        assert body.count(b'"usage"') > MAX_LOOKS
        assert last_field(body, "usage") == {"prompt_tokens": 200}
    models = {"choices": [{"model": "x", "text": "model"} for _ in range(100)], "model": "m"}
    assert first_field(json.dumps(models).encode(), "model") == "m"


@pytest.mark.parametrize("body, value", [
    (b'\xef\xbb\xbf{"model": "m", "usage": 1}', "m"),  # a UTF-8 BOM, which json.loads takes
    ('{"model": "a\ud800b", "usage": 1}'.encode("utf-8", "surrogatepass"), "a\ud800b"),
    (json.dumps({"model": "m" * (FIRST_FIELD_WINDOW + 10), "usage": 1}).encode(),
     "m" * (FIRST_FIELD_WINDOW + 10)),
    (json.dumps({"model": "m", "usage": 1}, indent=" " * 70000).encode(), "m"),
])
def test_bodies_off_the_fast_path_read_as_json_loads_reads_them(body, value):
    # Review 13, finding 3: each of these gave FieldNotFound or a wrong value.
    assert first_field(body, "model") == value == json.loads(body)["model"]
    assert last_field(body, "usage") == 1
