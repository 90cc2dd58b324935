"""The rayllm-auth command: keygen, hash and doctor (doctor in fresh interpreters, with the
.pth active, including a simulated unsupported Ray and a simulated changed layout)."""

import hashlib
import re
import time
from datetime import datetime, timezone
import io
import subprocess
import sys

import pytest

from rayllm_auth.cli import main
from rayllm_auth.keyfile import parse_key_file
from rayllm_auth.keystore import load_keys as load_key_set
from rayllm_auth.support import SUPPORTED_RAY
from tests.conftest import new_key
from tests.fresh_python import REPO, run_forked


def keygen_fields(out: str) -> dict:
    """keygen's output lines ``label (note):  value`` as {label: value}."""
    fields = {}
    for line in out.splitlines():
        label, value = line.split(":  ", 1)
        fields[label.split(" (")[0].rstrip(":")] = value.strip()
    return fields


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_keygen_prints_a_key_and_entries_that_accept_it(capsys):
    code, out, _ = run(capsys, "keygen", "--id", "team-a", "--models", "qwen,llama")
    fields = keygen_fields(out)
    key = fields["key"]
    assert code == 0 and key.startswith("sk-") and len(key) >= 40
    assert fields["hashed entry"] == f"team-a:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    for entry in (fields["hashed entry"], fields["plain entry"]):
        assert load_key_set({"RAY_LLM_API_KEYS": entry}).lookup(key.encode()).key_id == "team-a"
    (line,) = parse_key_file(fields["key file line"], "test")
    assert line.grant.models == {"qwen", "llama"}
    assert keygen_fields(run(capsys, "keygen")[1])["key"] != key  # a new key every time


def test_hash_reads_stdin_or_argument(capsys, monkeypatch):
    key = new_key()
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    code, out, _ = run(capsys, "hash", "--id", "ci")
    assert code == 0 and out == f"ci:sha256:{hashlib.sha256(key.encode()).hexdigest()}\n"
    assert run(capsys, "hash", key)[1] == out[len("ci:"):]


@pytest.mark.parametrize(("argv", "message"), [
    (["hash", "has space"], "not a usable key"),
    (["hash", "--id", "bad id", new_key()], "invalid id"),
    (["keygen", "--models", " , "], "--models"),
    (["keygen", "--expires", "soon"], "--expires"),
    (["keygen", "--expires", "2027-01-31T00:00:00"], "--expires"),
])
def test_bad_input_exits_2_with_a_clear_message_and_no_key(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err
    assert all(arg not in err for arg in argv if arg.startswith("sk-"))


def test_short_keys_are_hashed_with_a_warning(capsys):
    code, out, err = run(capsys, "hash", "short")
    assert code == 0 and "can be guessed" in err


def test_help_names_every_command():
    out = subprocess.run([sys.executable, "-m", "rayllm_auth", "--help"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert all(command in out for command in ("keygen", "hash", "doctor"))


DOCTOR = "from rayllm_auth.cli import main\nraise SystemExit(main(['doctor']))\n"


def iso_in(seconds: float) -> str:
    return datetime.fromtimestamp(int(time.time() + seconds), timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def test_doctor_reports_enforced_with_counts_and_ids_only(tmp_path):
    file_key, env_key = new_key(), new_key()
    soon = iso_in(3 * 86400)  # once: computed again later it could fall in the next hour
    (tmp_path / "keys").write_text(f"team-b:{file_key} models=qwen\n"
                                   f"old:{new_key()} expires={iso_in(-60)}\n"
                                   f"soon:{new_key()} expires={soon}\n"
                                   f"later:{new_key()} expires={iso_in(30 * 86400)}\n"
                                   f"batch:{new_key()} rpm=600 concurrency=8 tpm=90000\n"
                                   f"*  rpm=60\n")
    result = run_forked(DOCTOR, env={"RAY_LLM_API_KEYS": f"team-a:{env_key}",
                                     "RAY_LLM_API_KEYS_FILE": str(tmp_path / "keys")})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "1 key(s), 0 limited to some models; ids team-a" in out
    assert "5 key(s), 1 limited to some models; ids batch, later, old, soon, team-b" in out
    assert re.search(r"limits +6 key id\(s\), each across the app's replicas: batch \(rpm=600 "
                     r"concurrency=8 tpm=90000\), later \(rpm=60\), old \(rpm=60\), soon \(rpm=60\), "
                     r"team-a \(rpm=60\), team-b \(rpm=60\)\n", out)
    assert re.search(r"expired keys +old\n", out)
    assert re.search(rf"expiring in 7 days +soon at {soon[:13]}", out)
    assert "2.60.0, supported" in out and out.count(": present") == 2
    assert "auth ENFORCED" in out
    assert file_key not in out + result.stderr and env_key not in out + result.stderr


def test_doctor_fails_when_every_key_has_expired(tmp_path, monkeypatch, capsys, no_key_env):
    (tmp_path / "keys").write_text(f"a:{new_key()} expires={iso_in(-1)}\n"
                                   f"b:{new_key()} expires={iso_in(-86400)}\n")
    monkeypatch.setenv("RAY_LLM_API_KEYS_FILE", str(tmp_path / "keys"))
    code, out, _ = run(capsys, "doctor")
    assert code == 1 and "NOT ENFORCED" in out and "every configured key has expired" in out


def test_keygen_expires_after_a_duration_or_at_a_time(capsys):
    code, out, _ = run(capsys, "keygen", "--expires", "30d")
    (entry,) = parse_key_file(keygen_fields(out)["key file line"], "test")
    assert code == 0 and abs(entry.grant.expires - (time.time() + 30 * 86400)) < 5
    code, out, err = run(capsys, "keygen", "--expires", "2027-01-31T00:00:00Z", "--id", "x")
    assert keygen_fields(out)["key file line"].endswith("   expires=2027-01-31T00:00:00Z")
    assert "key file only" in err


def test_doctor_fails_loudly_on_unsupported_ray_and_bad_keys():
    result = run_forked("import ray; ray.__version__ = '2.61.0'\n" + DOCTOR,
                        env={"RAY_LLM_API_KEYS": " , ", "VLLM_API_KEY": new_key()})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Ray 2.61.0 is not supported (supported: ray {SUPPORTED_RAY})" in result.stdout
    assert "RAY_LLM_API_KEYS is set but holds no key" in result.stdout
    assert "NOT ENFORCED" in result.stdout


def test_doctor_fails_loudly_on_a_changed_layout():
    simulate = ("import wrapt\n"
                "wrapt.register_post_import_hook(lambda m: delattr(m, 'make_fastapi_ingress'),"
                " 'ray.llm._internal.serve.core.ingress.ingress')\n")
    result = run_forked(simulate + DOCTOR, env={"RAY_LLM_API_KEYS": new_key()})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT ENFORCED" in result.stdout
    # With keys set the .pth's patch fails closed first, so doctor sees what a replica would.
    assert "has no make_fastapi_ingress" in result.stdout


def test_doctor_without_keys_says_auth_is_off():
    result = run_forked(DOCTOR)
    assert result.returncode == 0 and "auth OFF" in result.stdout
