"""Run the IMAP proxy alone in this process (for tests and the benchmark).

    python -m tests.integration.imap.run_proxy SETTINGS.json

SETTINGS holds ``config`` (a dict for gateway.config.from_dict).  The DB must
already be seeded.  Prints one line ``READY {"starttls": port, "tls": port}``
on stdout once listening; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys


def main(path: str) -> None:
    settings = json.loads(open(path).read())
    logging.basicConfig(level=settings.get("log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import reactor

    from gateway.config import from_dict
    from gateway.db import connect
    from gateway.directory import Directory
    from gateway.imap import service

    config = from_dict(settings["config"])
    connect(config.database.url, migrate=False)  # the caller created the schema
    directory = Directory(config.company.domains, config.public_mail_domains)
    directory.load()
    service.DIRECTORY_REFRESH_INTERVAL = settings.get("refresh_interval", 0.0)
    ports = service.listen_imap(config, directory, reactor)
    found = {}
    for p in ports:
        kind = "tls" if p.getHost().port == config.imap.tls_port else "starttls"
        found[kind] = p.getHost().port
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    snapshots = os.environ.get("MAILGATE_TRACEMALLOC")
    if snapshots:  # for scripts/bench_imap.py --tracemalloc: SIGUSR1 writes a numbered snapshot
        import tracemalloc

        tracemalloc.start(int(os.environ.get("MAILGATE_TRACEMALLOC_FRAMES", "1")))
        taken = [0]

        def dump(*_: object) -> None:
            taken[0] += 1
            tracemalloc.take_snapshot().dump(f"{snapshots}.{taken[0]}")

        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))

    reactor.callWhenRunning(lambda: print("READY " + json.dumps(found), flush=True))
    profile = os.environ.get("MAILGATE_PROFILE")
    if profile:  # for scripts/bench_imap.py --profile
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, profile)
    else:
        reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
