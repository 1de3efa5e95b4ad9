"""Messages addressed to one key of the running job, through its control topic (config ``control_topic``).

The job reads the control topic next to the input topic; a control record's Kafka key is the pseudonym it is
for (the job routes it there without looking at the value), its value a small versioned JSON object with a
``kind``. Today: ``state_check`` (summarise what is kept for the key, answered on the audit topic: the evidence
that an erasure left nothing behind). Identity resolution's messages travel the same way.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

CONTROL_FORMAT = 1
STATE_CHECK = "state_check"
INVALID_CONTROL_MESSAGE = "invalid_control_message"
MAX_REQUEST_ID_LENGTH = 200


class ControlMessageError(ValueError):
    """A control record the job cannot read (dead-lettered with code invalid_control_message)."""


@dataclass(frozen=True)
class StateCheck:
    request_id: str


def state_check(request_id: str | None = None) -> bytes:
    """The value of a state-check request (``onramp privacy check`` sends it)."""
    return encode({"kind": STATE_CHECK, "request_id": request_id or str(uuid.uuid4())})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps({"v": CONTROL_FORMAT, **message}, separators=(",", ":")).encode()


def decode(value: bytes | None) -> dict[str, Any]:
    """The message as a dict with at least ``kind``; :class:`ControlMessageError` for anything else."""
    try:
        message = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlMessageError(f"control record is not JSON: {exc}") from None
    except RecursionError:  # json nests by recursion: `[[[[...` thousands deep would otherwise escape as an error
        raise ControlMessageError("control record is not a control message: JSON nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise ControlMessageError("control record has no 'kind'")
    if message.get("v") != CONTROL_FORMAT:
        raise ControlMessageError(f"control record format {message.get('v')!r} is not {CONTROL_FORMAT}; "
                                  "upgrade the job or the sender")
    return message


def parse_state_check(message: dict[str, Any]) -> StateCheck:
    request_id = message.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise ControlMessageError("state_check needs a request_id")
    # The answer carries the id (twice) in an Avro record: it must encode, and stay far below Kafka's record limit.
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise ControlMessageError(f"state_check request_id is {len(request_id)} characters; at most "
                                  f"{MAX_REQUEST_ID_LENGTH} (a UUID is 36)")
    if not request_id.isprintable():  # also refuses a lone surrogate (a JSON "\ud800"), which cannot be encoded
        raise ControlMessageError("state_check request_id must be printable text")
    return StateCheck(request_id)
