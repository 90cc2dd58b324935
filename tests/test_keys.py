"""Key configuration: syntax, errors that name the variable, ids, lookup."""

import hashlib
import logging
import pickle

import pytest

from rayllm_auth.errors import ConfigError
from rayllm_auth.keys import KeySet, key_id_for_digest
from rayllm_auth.keystore import load_keys as load_key_set
from tests.conftest import new_key


def keys_from(**env):
    return load_key_set(env)


def test_no_source_means_auth_off():
    assert load_key_set({}) is None


def test_comma_list_whitespace_and_empty_entries():
    a, b = new_key(), new_key()
    keys = keys_from(RAY_LLM_API_KEYS=f"  {a} ,, \n{b}\t, ")
    assert len(keys) == 2
    assert keys.lookup(a.encode()) and keys.lookup(b.encode())


def test_vllm_api_key_is_one_whole_key_even_with_commas_and_colons():
    weird = "abc,def:ghi=" + new_key()
    keys = keys_from(VLLM_API_KEY=f" {weird}\n")  # trailing newline from `echo` into a Secret
    assert keys.lookup(weird.encode())
    assert keys.lookup(b"abc") is None


def test_both_sources_are_valid_together():
    a, b = new_key(), new_key()
    keys = keys_from(RAY_LLM_API_KEYS=a, VLLM_API_KEY=b)
    assert keys.lookup(a.encode()) and keys.lookup(b.encode())
    assert keys.sources == ("RAY_LLM_API_KEYS", "VLLM_API_KEY")


@pytest.mark.parametrize("value", ["", " ", " , ", ",,,", "\n"])
def test_set_but_empty_list_is_an_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match="RAY_LLM_API_KEYS is set but holds no key"):
        keys_from(RAY_LLM_API_KEYS=value)


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_set_but_empty_vllm_key_is_an_error_naming_the_variable(value):
    with pytest.raises(ConfigError, match="VLLM_API_KEY is set but empty"):
        keys_from(VLLM_API_KEY=value)


def test_base64_keys_with_padding_need_no_quoting():
    key = "c2VjcmV0LWtleS13aXRoLXBhZGRpbmc="
    assert keys_from(RAY_LLM_API_KEYS=f"{key},team:{key}x==").lookup(key.encode()).key_id


def test_hashed_and_named_entries():
    a, b = new_key(), new_key()
    ha = hashlib.sha256(a.encode()).hexdigest()
    hb = hashlib.sha256(b.encode()).hexdigest()
    keys = keys_from(RAY_LLM_API_KEYS=f"sha256:{ha}, ops.team-1:sha256:{hb}")
    assert keys.lookup(a.encode()).key_id == key_id_for_digest(bytes.fromhex(ha))
    assert keys.lookup(b.encode()).key_id == "ops.team-1"
    assert keys.lookup(ha.encode()) is None  # the digest itself is not a key


def test_unnamed_key_id_is_the_same_plain_or_hashed_and_reveals_nothing():
    key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    plain_id = keys_from(RAY_LLM_API_KEYS=key).lookup(key.encode()).key_id
    hashed_id = keys_from(RAY_LLM_API_KEYS=f"sha256:{digest}").lookup(key.encode()).key_id
    assert plain_id == hashed_id
    assert plain_id.startswith("key-") and key not in plain_id and digest[:12] not in plain_id


@pytest.mark.parametrize(
    "entry, complaint",
    [
        ("a:b:c", "cannot be read"),
        ("sha256:xyz", "not a usable hashed key"),
        ("sha256:" + "A" * 64, "not a usable hashed key"),  # upper-case hex is refused
        ("bad id:key", "invalid id"),
        ("sha256:sha256:" + "a" * 64, "invalid id"),
        ("ok-id:", "not a usable key"),
        ("k\x00ey", "not a usable key"),
        ("kéy", "not a usable key"),
        ("x" * 600, "not a usable key"),
    ],
)
def test_unreadable_entries_are_errors_that_never_quote_the_entry(entry, complaint):
    with pytest.raises(ConfigError) as raised:
        keys_from(RAY_LLM_API_KEYS=f"{new_key()},{entry}")
    message = str(raised.value)
    assert complaint in message and "entry 2 of RAY_LLM_API_KEYS" in message
    assert entry not in message


def test_same_key_with_two_ids_is_an_error():
    key = new_key()
    with pytest.raises(ConfigError, match="configured twice"):
        keys_from(RAY_LLM_API_KEYS=f"a:{key},b:{key}")


def test_same_id_for_two_keys_is_allowed_for_rotation():
    old, new = new_key(), new_key()
    keys = keys_from(RAY_LLM_API_KEYS=f"team:{old},team:{new}")
    assert keys.lookup(old.encode()).key_id == keys.lookup(new.encode()).key_id == "team"


def test_short_key_warns_without_showing_it(caplog):
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        keys_from(RAY_LLM_API_KEYS="short-key-1")
    assert "could be guessed" in caplog.text and "short-key-1" not in caplog.text


def test_lookup_is_one_dict_probe_whatever_the_key_count():
    many = [new_key() for _ in range(10_000)]
    keys = keys_from(RAY_LLM_API_KEYS=",".join(many))
    assert len(keys) == 10_000
    assert keys.lookup(many[0].encode()) and keys.lookup(many[-1].encode())
    assert keys.lookup(many[-1].encode()[:-1]) is None


def test_no_configured_key_is_ever_compared_with_what_a_client_sent(monkeypatch):
    # Peer mistake 1 (vLLM CVE-2025-59425: byte-by-byte compare). The client's value is
    # hashed once and only its digest is looked up; the set holds digests, never keys.
    from rayllm_auth import keys as keys_module

    key = new_key()
    keys = keys_from(RAY_LLM_API_KEYS=f"team-a:{key}")
    hashed = []
    real_sha256 = keys_module._request_sha256
    monkeypatch.setattr(keys_module, "_request_sha256",
                        lambda data=b"": hashed.append(data) or real_sha256(data))
    assert keys.lookup(key.encode()).key_id == "team-a" and hashed == [key.encode()]
    assert all(isinstance(d, bytes) and len(d) == 32 for d in keys._grants)


def test_key_set_holds_only_digests_and_refuses_pickling():
    key = new_key()
    keys = keys_from(RAY_LLM_API_KEYS=key)
    assert isinstance(keys, KeySet)
    assert key.encode() not in repr(keys).encode()
    assert all(len(d) == 32 for d in keys._grants)
    with pytest.raises(TypeError, match="must not be pickled"):
        pickle.dumps(keys)


@pytest.mark.parametrize("entry", ["Models=qwen", "models=qwen", "EXPIRES=2027-01-01T00:00:00Z"])
def test_an_option_in_the_variable_is_an_error_in_any_case(entry):
    with pytest.raises(ConfigError, match="entry 2 of RAY_LLM_API_KEYS looks like an option"):
        keys_from(RAY_LLM_API_KEYS=f"team-b:{new_key()},{entry}")


@pytest.mark.parametrize("variable", ["RAY_LLM_API_KEYS", "VLLM_API_KEY"])
def test_a_byte_that_is_not_utf8_is_a_config_error_that_quotes_nothing(variable):
    # os.environ holds an undecodable byte (from a Secret) as a lone surrogate.
    key = new_key()
    with pytest.raises(ConfigError, match="not a usable key") as caught:
        keys_from(**{variable: key[:20] + "\udcff" + key[20:]})
    assert key[:20] not in str(caught.value) and "\udcff" not in str(caught.value)


def test_the_per_request_hash_is_sha256():
    from rayllm_auth.keys import _request_sha256

    for data in (b"", b"sk-" + bytes(range(0x21, 0x7f)), new_key().encode() * 9):
        assert _request_sha256(data).digest() == hashlib.sha256(data).digest()
