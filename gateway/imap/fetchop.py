"""FETCH of possibly tagged messages: an exclusive operation of a session.

Wait for commands in flight, learn UIDs, get or make decisions, then relay
untagged messages verbatim and each tagged message with translated items
through ``FetchRewriter``.  A mixin of ``ClientSession``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from gateway import metrics
from gateway.imap import upstream as up
from gateway.imap.decisions import Decision
from gateway.imap.fetchitems import WHOLE, FetchCommand, compress, explicit_uids
from gateway.imap.headers import READER_FIELDS, SENT_FIELDS
from gateway.imap.headers import apply as apply_splices
from gateway.imap.parser import FramerSink, ParseError
from gateway.imap.plan import needs_new_header, plan_message
from gateway.imap.prelogin import mailbox_key
from gateway.imap.rewrite import FetchCollector, FetchRewriter, fetch_seq

log = logging.getLogger("mailgate.imap")

HEADER_CACHE = 64  # rewritten-header sources kept per session (straddling partial fetches)
DECISION_CACHE = 50000  # decisions kept per session


class FetchOperation:
    """The exclusive FETCH operation (mixin of ClientSession)."""

    def _known_untagged(self, fc: FetchCommand) -> bool:
        """True for a UID FETCH of explicit UIDs all decided "nothing to tag": relay it like any
        command (pipelined, no look-ahead) — the common case once a mailbox has been seen."""
        if not fc.uid or self.mailbox is None or self.uidvalidity is None:
            return False
        if any(v in (b"SELECT", b"EXAMINE", b"CLOSE", b"UNSELECT") for vs in self.inflight.values() for v in vs):
            return False
        uids = explicit_uids(fc.sequence, limit=200)
        if not uids:
            return False
        missing = [u for u in uids if u not in self.decisions]
        if missing:
            self._remember(self.svc.cached_decisions(self.account, self.mailbox, self.uidvalidity, missing))
        decisions = self.decisions
        for u in uids:
            d = decisions.get(u)
            if d is None or d.tagged:
                return False
        return True

    def _start_fetch(self, fc: FetchCommand, raw: bytes) -> None:
        self.framer.paused = True
        self.exclusive = True
        d = defer.ensureDeferred(self._fetch(fc, raw))
        d.addErrback(self._fetch_failed)
        d.addBoth(self._end_exclusive)

    def _fetch_failed(self, f: Failure) -> None:
        if f.check(up.UpstreamUnavailable):
            self.close(b"[UNAVAILABLE] Connection to the mail server lost")
            return
        if f.check(ParseError):
            log.error("malformed upstream response, closing session: %s", f.getErrorMessage())
            self.close(b"[SERVERBUG] Malformed response from the mail server")
            return
        self._internal_error(f)

    def _end_exclusive(self, _: object) -> None:
        self.exclusive = False
        if self.upstream is not None:
            self.upstream.chooser = None
        if self.closing:
            return
        if self.client_valve:
            self.client_valve.resume("exclusive")
        try:
            self.framer.resume()
        except ParseError as exc:
            if str(exc) == "line too long":
                self._line_too_long()
            else:
                self.close(b"Protocol error: " + str(exc).encode())

    async def _wait_idle(self) -> None:
        if self.inflight:
            self._barrier = defer.Deferred()
            await self._barrier

    async def _lookahead(self, line: bytes) -> tuple[bytes, list]:
        """Run one of the proxy's own FETCHes; returns (completion, collected responses)."""
        assert self.upstream is not None
        sinks: list[FetchCollector] = []

        def choose(first: bytes) -> FramerSink | None:
            if fetch_seq(first) is None:
                return None
            c = FetchCollector(max_depth=self.cfg.max_nesting_depth)
            sinks.append(c)
            return c

        self.upstream.chooser = choose
        try:
            done = await self.upstream.send(line)
        finally:
            self.upstream.chooser = None
        results = []
        for c in sinks:
            r = c.result()
            results.append(r)
            extra = [(n, v) for n, v in r.extra if n.upper() not in (b"UID", b"BODY[HEADER]")]
            if extra:  # unsolicited changes (FLAGS …) that rode on our response
                body = b" ".join(n + b" " + r.buf[v.start : v.end] for n, v in extra)
                self.send(b"* %d FETCH (%s)\r\n" % (r.seq, body))
        return done, results

    async def _fetch(self, fc: FetchCommand, raw: bytes) -> None:
        assert self.upstream is not None and self.tagger is not None
        await self._wait_idle()
        if self.closing:
            return
        mailbox, uidvalidity = self.mailbox, self.uidvalidity
        if mailbox is None or uidvalidity is None:
            self._forward(fc.tag, raw)
            return
        verb = b"UID FETCH" if fc.uid else b"FETCH"
        # 1. which messages (seq -> uid)
        ids: dict[int, int] = {}  # id used in commands (seq or uid) -> uid
        known = explicit_uids(fc.sequence) if fc.uid else None
        if known is not None:
            missing = [u for u in known if u not in self.decisions]
            if missing:
                self._remember(self.svc.cached_decisions(self.account, mailbox, uidvalidity, missing))
        if known is not None and all(u in self.decisions for u in known):
            ids = {u: u for u in known}
        else:
            done, rows = await self._lookahead(verb + b" " + fc.sequence + b" (UID)\r\n")
            if up.status_of(done) != b"OK":
                self._forward(fc.tag, raw)
                return
            for r in rows:
                uid = r.items.get(b"UID")
                if uid is not None and uid.data.isdigit():
                    ids[int(uid.data) if fc.uid else r.seq] = int(uid.data)
        self._note_whole(fc, list(ids.values()))
        # 2. decisions: memory, DB, else decide from the header
        unknown = [u for u in ids.values() if u not in self.decisions]
        store = self.svc.store
        if unknown:
            shared = self.svc.cached_decisions(self.account, mailbox, uidvalidity, unknown)
            if shared:
                self._remember(shared)
                unknown = [u for u in unknown if u not in self.decisions]
        if unknown:
            loaded = await threads.deferToThreadPool(self.svc.reactor, self.svc.pool, store.load,
                                                     self.account, mailbox.decode("utf-8", "replace"),
                                                     uidvalidity, unknown)
            self._remember(loaded)
            self.svc.cache_decisions(self.account, mailbox, uidvalidity, loaded)
            unknown = [u for u in unknown if u not in self.decisions]
        if unknown:
            await self._decide(fc, ids, set(unknown), mailbox, uidvalidity)
        tagged = {i: u for i, u in ids.items() if self.decisions.get(u, None) is not None
                  and self.decisions[u].tagged}
        if not tagged:
            self._forward(fc.tag, raw)
            return
        # 3. untagged messages verbatim, tagged ones one by one, rewritten
        fields = SENT_FIELDS if self._sent_like() else READER_FIELDS
        completions: list[bytes] = []
        if b"VANISHED" in fc.modifiers.upper():
            # QRESYNC: the split sets below name existing messages only; let the client hear
            # about expunged UIDs of its original range (FETCH UID/MODSEQ responses pass as they are).
            completions.append(await self.upstream.send(fc.command(b"", fc.sequence, b"(UID)")[1:]))
        plain = [i for i in ids if i not in tagged]
        if plain:
            completions.append(await self.upstream.send(fc.command(b"", compress(plain))[1:]))
        for i, uid in sorted(tagged.items()):
            d = self.decisions[uid]
            new_header = None
            if needs_new_header(fc, d):
                new_header = await self._new_header(verb, i, uid, d)
            plan = plan_message(fc, d, fields, new_header)
            completions.append(await self._run_rewritten(fc.command(b"", b"%d" % i, plan.items)[1:], plan.handlers))
            for t in d.tags:
                metrics.imap_tagged.labels(t).inc()
        final = next((c for c in completions if up.status_of(c) != b"OK"), completions[0])
        self.send(fc.tag + b" " + final)

    def _note_whole(self, fc: FetchCommand, uids: list[int]) -> None:
        """Archive hook: tell the capture worker which messages are being served whole."""
        hook = self.svc.on_whole_fetch
        if hook is not None and uids and self.mailbox is not None and self.uidvalidity is not None \
                and any(i.kind == WHOLE for i in fc.items):
            hook(self.account, self.mailbox, self.uidvalidity, uids)

    def _forward(self, tag: bytes, raw: bytes) -> None:
        assert self.upstream is not None
        self.inflight.setdefault(tag, []).append(b"FETCH")
        self.upstream.write(raw)

    def _remember(self, decisions: dict[int, Decision]) -> None:
        if len(self.decisions) + len(decisions) > DECISION_CACHE:
            self.decisions = {}
        self.decisions.update(decisions)

    def _sent_like(self) -> bool:
        return self.mailbox is not None and mailbox_key(self.mailbox) in self.special

    async def _decide(self, fc: FetchCommand, ids: dict[int, int], unknown: set[int], mailbox: bytes,
                      uidvalidity: int) -> None:
        assert self.tagger is not None
        verb = b"UID FETCH" if fc.uid else b"FETCH"
        wanted = [i for i, u in ids.items() if u in unknown]
        done, rows = await self._lookahead(verb + b" " + compress(wanted) + b" (UID BODY.PEEK[HEADER])\r\n")
        if up.status_of(done) != b"OK":
            return
        sent_like = self._sent_like()
        await self.svc.maybe_refresh_directory()
        new: dict[int, Decision] = {}
        heads: dict[int, bytes] = {}
        for r in rows:
            uid_v = r.items.get(b"UID")
            if uid_v is None or not uid_v.data.isdigit():
                continue
            uid = int(uid_v.data)
            if uid not in unknown:
                continue
            hv = r.items.get(b"BODY[HEADER]")
            header = hv.text() if hv is not None else None
            new[uid] = self.tagger.decide(header, sent_like)
            if header is not None and new[uid].tagged:
                heads[uid] = header
        svc = self.svc
        stored = await threads.deferToThreadPool(svc.reactor, svc.pool, svc.store.save, self.account,
                                                 mailbox.decode("utf-8", "replace"), uidvalidity, new)
        self._remember(stored)
        svc.cache_decisions(self.account, mailbox, uidvalidity, stored)
        for uid, h in heads.items():
            self._cache_header(uid, h)

    def _cache_header(self, uid: int, header: bytes) -> None:
        cache = self.header_cache
        if cache is None:
            cache = self.header_cache = OrderedDict()
        cache[uid] = header
        cache.move_to_end(uid)
        while len(cache) > HEADER_CACHE:
            cache.popitem(last=False)

    async def _new_header(self, verb: bytes, i: int, uid: int, d: Decision) -> bytes:
        header = self.header_cache.get(uid) if self.header_cache is not None else None
        if header is None:
            done, rows = await self._lookahead(verb + b" %d (UID BODY.PEEK[HEADER])\r\n" % i)
            for r in rows:
                hv = r.items.get(b"BODY[HEADER]")
                if hv is not None and hv.text() is not None:
                    header = hv.text()
            if header is None:
                raise ParseError("upstream did not return the header of a tagged message")
            self._cache_header(uid, header)
        return apply_splices(header, d.splices)

    async def _run_rewritten(self, line: bytes, handlers: dict) -> bytes:
        assert self.upstream is not None

        def choose(first: bytes) -> FramerSink | None:
            if fetch_seq(first) is None:
                return None
            return FetchRewriter(handlers, self.send, self.cfg.max_nesting_depth)

        self.upstream.chooser = choose
        try:
            return await self.upstream.send(line)
        finally:
            self.upstream.chooser = None


