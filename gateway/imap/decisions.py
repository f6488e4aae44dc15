"""Tag decisions: made once per (account, mailbox, UIDVALIDITY, UID), then fixed.

A decision records the exact splices on the upstream header (and the ENVELOPE
names), so RFC822.SIZE, BODY[] and every partial fetch a client has cached stay
consistent forever, whatever happens to the customer list afterwards.
The store's methods block (DB): call them in a thread, never on the reactor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.directory import COLLEAGUE, OWN, Directory
from gateway.imap import headers
from gateway.imap.headers import Splice

#: Headers larger than this are never tagged (and never buffered).
MAX_HEADER = 256 * 1024


@dataclass(frozen=True, slots=True)
class Decision:
    header_len: int = 0
    splices: tuple[Splice, ...] = ()
    names: tuple[tuple[str, str, bytes], ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        return bool(self.splices or self.names)

    @property
    def delta(self) -> int:
        return headers.delta(self.splices)

    @property
    def new_header_len(self) -> int:
        return self.header_len + self.delta

    def envelope_name(self, field: str, address: str, occurrence: int = 0) -> bytes | None:
        """Tagged ENVELOPE name for the ``occurrence``-th (from 0) appearance of ``address`` in
        the ENVELOPE field ``field``, if any.

        ``names`` holds one entry per tagged address in the header, in header order; an
        address shown twice (``To: "A" <x@y>, "B" <x@y>``) has two entries, each with the
        name tagged from its own display name, and its n-th appearance in the ENVELOPE gets
        the n-th (the last, should the ENVELOPE show it more often than the header). The
        ENVELOPE's sender and reply-to default to From's addresses when the header has none.
        """
        phrases = [phrase for f, a, phrase in self.names if f == field and a == address]
        if not phrases and field in ("sender", "reply-to"):
            phrases = [phrase for f, a, phrase in self.names if f == "from" and a == address]
        if not phrases:
            return None
        return headers.envelope_name(phrases[min(occurrence, len(phrases) - 1)])

    def to_json(self) -> str:
        if not self.tagged:
            return "{}"
        return json.dumps(
            {
                "h": self.header_len,
                "s": [[s.offset, s.old.decode("latin-1"), s.new.decode("latin-1")] for s in self.splices],
                "n": [[f, a, p.decode("latin-1")] for f, a, p in self.names],
                "t": list(self.tags),
            },
            ensure_ascii=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Decision:
        data = json.loads(text or "{}")
        if not data:
            return EMPTY
        return cls(
            header_len=int(data["h"]),
            splices=tuple(Splice(int(o), a.encode("latin-1"), b.encode("latin-1")) for o, a, b in data["s"]),
            names=tuple((f, a, p.encode("latin-1")) for f, a, p in data["n"]),
            tags=tuple(data.get("t", ())),
        )


EMPTY = Decision()


@dataclass(frozen=True, slots=True)
class Tagger:
    """Who is reading, and with which tag texts."""

    directory: Directory
    employee_id: int
    tag_own: str
    tag_colleague: str

    def tag_for(self, address: str) -> str | None:
        rel = self.directory.relationship(address, self.employee_id)
        if rel == OWN:
            return self.tag_own
        if rel == COLLEAGUE:
            return self.tag_colleague
        return None

    def decide(self, header: bytes | None, sent_like: bool) -> Decision:
        """Decide for one message from its full upstream header (None: too big/unknown)."""
        if header is None or len(header) > MAX_HEADER:
            return EMPTY
        fields = headers.SENT_FIELDS if sent_like else headers.READER_FIELDS
        used: list[str] = []

        def tag_for(address: str) -> str | None:
            tag = self.tag_for(address)
            if tag and tag not in used:
                used.append(tag)
            return tag

        p = headers.plan(header, fields, tag_for, (self.tag_own, self.tag_colleague))
        if not p.splices and not p.names:
            return EMPTY
        return Decision(len(header), p.splices, p.names, tuple(used))


class DecisionStore:
    """TagDecision rows; blocking calls (run them with deferToThread)."""

    CHUNK = 400

    def load(self, account: str, mailbox: str, uidvalidity: int, uids: Iterable[int]) -> dict[int, Decision]:
        from gateway.db.models import TagDecision

        out: dict[int, Decision] = {}
        uids = list(uids)
        for i in range(0, len(uids), self.CHUNK):
            part = uids[i : i + self.CHUNK]
            rows = (
                TagDecision.select(TagDecision.uid, TagDecision.decision)
                .where(
                    (TagDecision.account == account)
                    & (TagDecision.mailbox == mailbox)
                    & (TagDecision.uidvalidity == uidvalidity)
                    & (TagDecision.uid.in_(part))
                )
                .tuples()
            )
            for uid, text in rows:
                out[int(uid)] = Decision.from_json(text)
        return out

    def save(self, account: str, mailbox: str, uidvalidity: int, decisions: dict[int, Decision]) -> dict[int, Decision]:
        """Persist new decisions; the first writer wins.  Returns what is stored."""
        from gateway.db.models import TagDecision, database

        if not decisions:
            return {}
        rows = [
            {"account": account, "mailbox": mailbox, "uidvalidity": uidvalidity, "uid": uid, "decision": d.to_json()}
            for uid, d in decisions.items()
        ]
        with database.atomic():
            for i in range(0, len(rows), self.CHUNK // 2):
                TagDecision.insert_many(rows[i : i + self.CHUNK // 2]).on_conflict_ignore().execute()
        return self.load(account, mailbox, uidvalidity, decisions)
