"""gateway.smtp.dataread.read_data: the same message as aiosmtpd's line loop, however the
bytes arrive, and nothing after the end-of-data line consumed."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.smtp.dataread import LINE_TOO_LONG, TOO_MUCH, read_data

LINE_LIMIT = 1001


def reference(stream: bytes, size_limit: int | None, line_limit: int) -> tuple[bytes | None, str | None, bytes]:
    """RFC 5321 4.5.2 the slow way, as aiosmtpd's smtp_DATA does it: lines split at CRLF only,
    the data ends at a line that is exactly ".", each line loses a leading ".".  Returns the
    message or the error reply, and what is left after the end-of-data line."""
    lines, pos, size, too_long = [], 0, 0, False
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line = stream[pos:end]
        pos = end
        if line == b".\r\n":
            break
        size += len(line)
        too_long |= len(line) > line_limit
        lines.append(line[1:] if line.startswith(b".") else line)
    rest = stream[pos:]
    if size_limit and size > size_limit:
        return None, TOO_MUCH, rest
    if too_long:
        return None, LINE_TOO_LONG, rest
    return b"".join(lines), None, rest


async def feed_in_pieces(stream: bytes, cuts: list[int], size_limit: int | None, stream_limit: int):
    reader = asyncio.StreamReader(limit=stream_limit)
    task = asyncio.ensure_future(read_data(reader, size_limit, LINE_LIMIT))
    last = 0
    for cut in [*cuts, len(stream)]:
        reader.feed_data(stream[last:cut])
        last = cut
        for _ in range(3):  # let read_data take what is there before more arrives
            await asyncio.sleep(0)
    content, error = await asyncio.wait_for(task, 30)  # a hang (an end-of-data line missed) fails
    rest = reader._buffer[:]  # what a pipelining client sent after the data
    return content, error, bytes(rest)


PIECES = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r", b"x" * 50, b"Subject: hi",
          b"\n.\n", b"\r.\r", b"\r\n..\r\n", b"\xe4\xb8\xad"]


def random_stream(rng: random.Random) -> bytes:
    body = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 40)))
    if rng.random() < 0.1:
        body += b"y" * rng.choice([999, 1000, 1001, 3000])  # around the line limit
    if not body.endswith(b"\r\n") and body:
        body += b"\r\n"
    while b"\r\n.\r\n" in b"\r\n" + body:  # keep the first end-of-data line where we put it
        body = (b"\r\n" + body).replace(b"\r\n.\r\n", b"\r\n..\r\n")[2:]
    return body + b".\r\nQUIT\r\n"


@pytest.mark.parametrize("seed", range(300))
def test_same_result_as_the_line_loop_whatever_the_fragmentation(seed):
    rng = random.Random(seed)
    stream = random_stream(rng)
    size_limit = rng.choice([None, 100, 10_000])
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 12))))
    got = asyncio.run(feed_in_pieces(stream, cuts, size_limit, rng.choice([1001, 64, 8192])))
    assert got == reference(stream, size_limit, LINE_LIMIT), stream


@pytest.mark.parametrize("stream, content", [
    (b".\r\n", b""),  # no lines at all
    (b"..\r\n.\r\n", b".\r\n"),  # a first line of one (stuffed) dot
    (b"a\r\n\r\n.\r\n", b"a\r\n\r\n"),  # an empty last line
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),  # bare LF dot: not the end (SMTP smuggling)
    (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n"),  # bare CR dot: not the end
    (b"a\r\n.x\r\n..\r\n.\r\n", b"a\r\nx\r\n.\r\n"),
])
def test_edges_one_byte_at_a_time(stream, content):
    got = asyncio.run(feed_in_pieces(stream + b"NOOP\r\n", list(range(1, len(stream) + 6)), None, 1001))
    assert got == (content, None, b"NOOP\r\n")


def test_limits_answer_after_the_whole_message():
    long_line = b"x" * 1000 + b"\r\n"  # 1002 bytes with its CRLF
    assert asyncio.run(feed_in_pieces(long_line + b".\r\nQUIT\r\n", [], None, 1001)) == \
        (None, LINE_TOO_LONG, b"QUIT\r\n")
    ok_line = b"x" * 999 + b"\r\n"
    assert asyncio.run(feed_in_pieces(ok_line + b".\r\n", [], None, 1001)) == (ok_line, None, b"")
    big = b"".join(b"%05d\r\n" % i for i in range(20_000))  # 140 KB, read in pieces, mostly dropped
    assert asyncio.run(feed_in_pieces(big + b".\r\nQUIT\r\n", [5000, 70_001], 1000, 1001)) == \
        (None, TOO_MUCH, b"QUIT\r\n")
    assert asyncio.run(feed_in_pieces(big + b".\r\n", [], len(big), 1001)) == (big, None, b"")


def test_a_closed_connection_before_the_end_is_an_incomplete_read():
    async def main():
        reader = asyncio.StreamReader(limit=1001)
        reader.feed_data(b"Subject: x\r\n\r\nbody\r\n")
        reader.feed_eof()
        await read_data(reader, None, LINE_LIMIT)

    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(main())
