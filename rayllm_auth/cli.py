"""``rayllm-auth``: make keys, hash keys, and check whether auth would be enforced here.

    rayllm-auth keygen [--id NAME] [--models M1,M2] [--expires 30d|TIME]
                                                       a new random key and its config entries
    rayllm-auth hash [--id NAME] [KEY]                 the hashed entry of KEY (or of stdin)
    rayllm-auth doctor                                 what this environment would do

``doctor`` exits 1 when keys are configured but would not be enforced in this process
(unsupported Ray, a patch target missing, an unusable key source, auto-activation off) or
when every configured key has expired, 0 otherwise; it lists keys that expire within 7 days.
Run it where the replicas run, i.e. in the application's runtime_env (see README).
Nothing here prints key material except ``keygen``, which prints the key it just made.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from rayllm_auth import __version__
from rayllm_auth._bootstrap import KILL_SWITCH, autopatch_disabled
from rayllm_auth.errors import ConfigError
from rayllm_auth.keyfile import parse_expiry
from rayllm_auth.keys import (
    KEY_SOURCES,
    RAY_LLM_API_KEYS,
    SHORT_KEY_WARNING_LENGTH,
    is_sendable_key,
    parse_entry,
)
from rayllm_auth.keystore import load_keys, read_sources

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return args.command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayllm-auth",
        description="API keys for Ray Serve LLM: make and hash keys, check an environment.",
    )
    parser.add_argument("--version", action="version", version=f"rayllm-auth {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    keygen = commands.add_parser(
        "keygen", help="print a new random key and the config entries for it",
        description="Print a new random key (32 random bytes, URL-safe) with its entries for "
                    f"{RAY_LLM_API_KEYS} and the key file, plain and hashed. Give the key to "
                    "the client; configure the hashed entry.")
    keygen.add_argument("--id", help="non-secret key id for logs and metrics (default: derived)")
    keygen.add_argument("--models", help="comma-separated models the key may use (key file only)")
    keygen.add_argument("--expires", metavar="WHEN",
                        help="when the key stops working (key file only): a duration from now "
                             "such as 30d, 12h or 90m, or an ISO 8601 time with its zone")
    keygen.set_defaults(command=_keygen)

    hash_ = commands.add_parser(
        "hash", help="print the hashed config entry of a key",
        description="Print sha256:<hex> for KEY, the form that puts no usable secret in a "
                    "config. Without KEY (or with -) the key is read from standard input, "
                    "which keeps it out of shell history.")
    hash_.add_argument("key", nargs="?", default="-", help="the key, or - for standard input")
    hash_.add_argument("--id", help="prefix the entry with this key id")
    hash_.set_defaults(command=_hash)

    doctor = commands.add_parser(
        "doctor", help="report whether auth would be enforced in this process",
        description="Report the Ray version and whether rayllm-auth supports it, which patch "
                    "targets are present, which key sources are configured (counts and ids "
                    "only), keys that expire within 7 days, and whether auth would be enforced "
                    "here. Exits 1 when keys are configured but would not be enforced, or "
                    "when every configured key has expired.")
    doctor.set_defaults(command=_doctor)
    return parser


# -- keygen / hash ----------------------------------------------------------------------


def _keygen(args) -> int:
    key = "sk-" + secrets.token_urlsafe(32)
    prefix = _id_prefix(args.id)
    options = _models_field(args.models) + _expires_field(args.expires)
    hashed = f"{prefix}sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    print(f"key (give to the client; shown once):  {key}")
    print(f"hashed entry (recommended):            {hashed}")
    print(f"plain entry:                           {prefix}{key}")
    print(f"key file line:                         {hashed}{options}")
    if options:
        print("note: models= and expires= work in the key file only, not in RAY_LLM_API_KEYS",
              file=sys.stderr)
    return 0


def _hash(args) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not is_sendable_key(key.encode()):
        _fail("not a usable key: keys are printable ASCII without spaces (at most 512 bytes)")
    if len(key) < SHORT_KEY_WARNING_LENGTH:
        print(f"warning: keys shorter than {SHORT_KEY_WARNING_LENGTH} characters can be "
              "guessed from their hash; use rayllm-auth keygen", file=sys.stderr)
    print(f"{_id_prefix(args.id)}sha256:{hashlib.sha256(key.encode()).hexdigest()}")
    return 0


def _id_prefix(key_id: Optional[str]) -> str:
    if key_id is None:
        return ""
    try:
        parse_entry(f"{key_id}:sha256:{'0' * 64}", "--id")
    except ConfigError as exc:
        _fail(str(exc))
    return f"{key_id}:"


def _models_field(models: Optional[str]) -> str:
    if models is None:
        return ""
    names = [m for m in models.split(",") if m.strip()]
    if not names or any(m != m.strip() or " " in m for m in names):
        _fail("--models: give comma-separated model ids without spaces")
    return "   models=" + ",".join(names)


_DURATION = re.compile(r"([1-9][0-9]{0,5})([dhm])")
_SECONDS_PER = {"d": 86400, "h": 3600, "m": 60}


def _expires_field(when: Optional[str], now: Optional[float] = None) -> str:
    if when is None:
        return ""
    duration = _DURATION.fullmatch(when)
    if duration:
        number, unit = duration.groups()
        at = (time.time() if now is None else now) + int(number) * _SECONDS_PER[unit]
    else:
        try:
            at = parse_expiry(when, "--expires")
        except ConfigError:
            _fail("--expires: give a duration such as 30d, 12h or 90m, or an ISO 8601 time "
                  "with its zone such as 2027-01-31T00:00:00Z")
    return "   expires=" + _iso(at)


def _iso(unix_time: float) -> str:
    return datetime.fromtimestamp(int(unix_time), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(message: str) -> None:
    print(f"rayllm-auth: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- doctor -----------------------------------------------------------------------------


class _Report:
    def __init__(self):
        self.problems: list[str] = []

    def line(self, label: str, text: str) -> None:
        print(f"  {label:<23}{text}")

    def problem(self, label: str, text: str) -> None:
        self.problems.append(text)
        self.line(label, "PROBLEM: " + text)


#: doctor lists keys that expire within this many seconds.
EXPIRY_WARNING_S = 7 * 86400


def _doctor(args) -> int:
    report = _Report()
    print(f"rayllm-auth {__version__} doctor (python {sys.executable})")
    keys_configured = _report_key_sources(report)
    _report_activation(report)
    _report_ray(report)
    if not keys_configured:
        report.line("verdict", "auth OFF: no key source is set in this process (stock Ray "
                               "Serve LLM); replicas enforce keys only where a key source is set")
        return 0
    if report.problems:
        report.line("verdict", "NOT ENFORCED: keys are configured but " + "; ".join(report.problems))
        return 1
    report.line("verdict", "auth ENFORCED: every Serve LLM app served from this environment "
                           "needs a valid key")
    return 0


def _report_key_sources(report: _Report) -> bool:
    sources = read_sources()
    reported = {source.variable: source for source in sources}
    for name in KEY_SOURCES:
        source = reported.get(name)
        if source is None:
            report.line(name, "not set")
        elif source.error is not None:
            report.problem(name, source.error)
        else:
            entries = source.entries
            limited = sum(e.grant.models is not None for e in entries)
            ids = sorted({e.grant.key_id for e in entries})
            where = f"{source.path}: " if source.path else ""
            report.line(name, f"{where}{len(entries)} key(s), {limited} limited to some models; "
                              f"ids {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    if sources and not any(source.error for source in sources):
        try:
            keys = load_keys()
        except ConfigError as exc:
            report.problem("key sources", str(exc))
        else:
            _report_expiry(report, keys.grants)
            _report_limits(report, keys.grants)
    return bool(sources)


def _report_limits(report: _Report, grants: list) -> None:
    described = sorted({
        f"{g.key_id} ({' '.join(f'{name}={value}' for name, value in limits if value)})"
        for g in grants if g.rate_limited
        for limits in [(("rpm", g.rpm), ("concurrency", g.concurrency), ("tpm", g.tpm))]})
    if described:
        report.line("limits", f"{len(described)} key id(s), each across the app's replicas: "
                              f"{', '.join(described[:10])}{' ...' if len(described) > 10 else ''}")


def _report_expiry(report: _Report, grants: list, now: Optional[float] = None) -> None:
    now = time.time() if now is None else now
    expiring = sorted((g.expires, g.key_id) for g in grants if g.expires is not None)
    expired = [key_id for at, key_id in expiring if at <= now]
    soon = [f"{key_id} at {_iso(at)}" for at, key_id in expiring
            if now < at <= now + EXPIRY_WARNING_S]
    if expired:
        report.line("expired keys", ", ".join(expired))
    if soon:
        report.line("expiring in 7 days", ", ".join(soon))
    if grants and len(expired) == len(grants):
        report.problem("key expiry", "every configured key has expired")


def _report_activation(report: _Report) -> None:
    pth = Path(__file__).resolve().parent.parent / "rayllm_auth.pth"
    if autopatch_disabled():
        report.problem("auto-activation", f"off ({KILL_SWITCH} is set); use "
                                          "import_path: rayllm_auth:build_openai_app instead")
    elif not pth.exists():
        report.problem("auto-activation", f"rayllm_auth.pth is not installed next to the package "
                                          f"({pth.parent}); install rayllm-auth with pip")
    else:
        report.line("auto-activation", f"on ({pth})")


def _report_ray(report: _Report) -> None:
    from rayllm_auth.patching import missing_attributes
    from rayllm_auth.support import ALLOW_UNTESTED_RAY, SUPPORTED_RAY, choose_layout

    try:
        import ray
    except ImportError as exc:
        report.problem("ray", f"Ray cannot be imported here ({exc})")
        return
    version = getattr(ray, "__version__", "unknown")
    layout, untested = choose_layout(version, enforce=True)
    if layout is None:
        report.problem("ray", f"Ray {version} is not supported (supported: ray {SUPPORTED_RAY})")
        return
    if untested:
        report.line("ray", f"{version}, NOT in the support table (ray {SUPPORTED_RAY}); "
                           f"{ALLOW_UNTESTED_RAY} is set: trying {layout.name}")
    else:
        report.line("ray", f"{version}, supported ({layout.ray}: {layout.name})")
    for module_name, paths in layout.required().items():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            report.problem("patch targets", f"{module_name} cannot be imported ({exc})")
            continue
        missing = missing_attributes(module, paths)
        if missing:
            report.problem("patch targets", f"{module_name} has no {', '.join(missing)} "
                                            f"(Ray {version} changed its layout)")
        else:
            report.line("patch targets", f"{module_name}: {', '.join(paths)}: present")
