"""`onramp privacy ...`: the pseudonymization key, a user's pseudonym, and what the running job keeps for a user.

These are the tools behind a data-subject request: find the pseudonym the audit trail uses for a user, and show
that after an erasure the job keeps nothing of the user's profile (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from typing import Any, Callable

from jobs.config import OnrampConfig

log = logging.getLogger("onramp.privacy")

PRIVACY_HELP = """privacy: pseudonyms, audit trail and state checks (docs/privacy.md)

  onramp privacy new-key                 create the pseudonymization key file (config pseudonym_key_file)
  onramp privacy pseudonym --user ID     the pseudonym state, audit records and logs use for a user
  onramp privacy check --user ID         ask the running job what it keeps for the user (field names and size,
                                         never values), answered on the audit topic; exit 1 if anything of the
                                         profile is kept
  onramp privacy audit --user ID         the user's audit records (decisions, erasures, state checks)

Use --anonymous-id ID instead of --user for a visitor before signup. Ids are pseudonymized here with the same key
the job uses (ONRAMP_PSEUDONYM_KEY, else the key file), so run these where that key is available.
"""


class PrivacyError(RuntimeError):
    """A privacy command could not do its job; the message says what to do."""


def _subject(cfg: OnrampConfig, args: argparse.Namespace) -> str:
    from udfs.pseudonym import load_key

    key = load_key(cfg.pseudonym_key_file)
    if args.user:
        return key.user(args.user)
    if args.anonymous_id:
        return key.anon(args.anonymous_id)
    raise PrivacyError("name the subject: --user ID or --anonymous-id ID")


def cmd_new_key(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from udfs.pseudonym import write_new_key

    key = write_new_key(cfg.pseudonym_key_file)
    log.info("created %s (key id %s); the key itself is not shown", cfg.pseudonym_key_file, key.key_id)
    return 0


def cmd_pseudonym(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    print(_subject(cfg, args))
    return 0


def request_state_check(cfg: OnrampConfig, subject: str, timeout_s: float) -> dict[str, Any]:
    """Send a state check for ``subject`` to the running job and wait for its answer on the audit topic."""
    from jobs.kafka_admin import require_broker
    from jobs.kafka_io import end_offsets, make_producer, read_records
    from udfs import control
    from udfs.avro_codec import audit_codec

    if not cfg.audit_topic:
        raise PrivacyError("audit_topic is off: the job answers state checks on the audit topic")
    require_broker(cfg)
    start = end_offsets(cfg, cfg.audit_topic)
    request_id = str(uuid.uuid4())
    producer = make_producer(cfg)
    producer.send(cfg.control_topic, key=subject.encode(), value=control.state_check(request_id))
    producer.flush()
    producer.close()
    codec = audit_codec()
    deadline = time.monotonic() + timeout_s
    for record in read_records(cfg, cfg.audit_topic, start_offsets=start, timeout_s=timeout_s):
        audit = codec.decode(record.value)
        if audit["kind"] == "state_check" and audit["request_id"] == request_id:
            return audit
        if time.monotonic() > deadline:
            break
    raise PrivacyError(f"no answer to state check {request_id} within {timeout_s:.0f}s: is the personalize job "
                       "running (`onramp status`) and reading the control topic?")


def cmd_check(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    answer = request_state_check(cfg, _subject(cfg, args), args.timeout)
    state = answer["state"]
    print(json.dumps({"subject": answer["subject"], "pseudonym_key_id": answer["pseudonym_key_id"], **state}))
    return 1 if any(name.startswith("profile.") for name in state["profile_fields"]) else 0


def cmd_audit(cfg: OnrampConfig, args: argparse.Namespace) -> int:
    from jobs.kafka_admin import require_broker
    from jobs.kafka_io import read_records
    from udfs.avro_codec import audit_codec

    subject = _subject(cfg, args)
    require_broker(cfg)
    codec = audit_codec()
    for record in read_records(cfg, cfg.audit_topic, timeout_s=args.timeout, idle_timeout_s=3.0):
        audit = codec.decode(record.value)
        if audit["subject"] == subject:
            print(json.dumps(audit, default=str))
    return 0


def add_privacy_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    group = sub.add_parser("privacy", help="pseudonyms, audit trail and state checks for data-subject requests",
                           description=PRIVACY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    add("new-key", cmd_new_key, "create the pseudonymization key file (refuses to overwrite one)", under=actions)
    for name, func, help_text in (
        ("pseudonym", cmd_pseudonym, "print the pseudonym of a user or anonymous id"),
        ("check", cmd_check, "what the running job keeps for a user (names and size, no values)"),
        ("audit", cmd_audit, "print a user's audit records as JSON lines"),
    ):
        p = add(name, func, help_text, under=actions)
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user", metavar="ID", help="a user id")
        who.add_argument("--anonymous-id", metavar="ID", help="an anonymous (pre-signup) id")
        if name != "pseudonym":
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
