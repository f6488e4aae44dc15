"""Unexpected exceptions on the submission path: what the client is told, what the log says.

aiosmtpd answers an exception escaping a hook with ``500 Error: (Type) text`` — a permanent
code (some clients bounce the mail to the user) that shows internals to the client.  The
submission path answers 4xx instead, so the client keeps the message and sends it again, and
logs the exception without its text: an exception's message can quote the mail (a header, the
subject, what a rule matched), which the log never holds.  Its type, the types it was raised
from, and its frames say where it happened.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from gateway.db.errors import type_name

# End of DATA: the policy decision raised (a rule's bug, a database error while deciding).
POLICY_TEMPFAIL = "451 4.3.0 Temporary policy error, try again later"
# Anything else unexpected: at the end of DATA before the 250 (building the context, the
# reply), or in another command's hook (MAIL, RCPT, AUTH …; SubmissionSMTP.handle_exception).
LOCAL_TEMPFAIL = "451 4.3.0 Temporary local error, try again later"

_ROOT = str(Path(__file__).resolve().parents[2]) + "/"


class PolicyError(Exception):
    """``Policy.decide`` raised; the original exception is ``__cause__``.  Nothing of the
    message was written yet."""


def _type_name(exc: BaseException) -> str:
    name = type_name(exc)
    if isinstance(exc, OSError) and exc.strerror:
        name += f" ({exc.strerror})"  # the system's text only, never the file name
    return name


def _where(frame: traceback.FrameSummary) -> str:
    filename = frame.filename
    if filename.startswith(_ROOT):
        filename = filename[len(_ROOT):]
    return f"{filename}:{frame.lineno} in {frame.name}"


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(one line: the types, raised-from chain first to last, and where the first was raised;
    the frames, a traceback without the exception's text)."""
    names, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(_type_name(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    frames = traceback.extract_tb(exc.__traceback__)
    summary = " from ".join(names) + (f" at {_where(frames[-1])}" if frames else "")
    return summary, "".join(traceback.format_list(frames)).rstrip("\n")
