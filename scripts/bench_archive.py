#!/usr/bin/env python3
"""Archive search benchmark (issue 6): ingest msg/s and search latency p50/p95.

    python scripts/bench_archive.py                      # quick: 20k corpus, SQLite
    python scripts/bench_archive.py --n 1000000          # the real run (SQLite)
    python scripts/bench_archive.py --n 200000 --backend postgres

Two separate measurements, honestly labelled:

1. **Ingest** (``--ingest N``, default 2000): realistic raw MIME messages (Chinese and
   English text, 30 % with attachments of 20–400 KB) through the real path — hash, zstd,
   AES-GCM, durable blob write, chained record and sighting, full-text indexing — twice:
   ``Archive.record`` one message at a time in transactions of ``--batch`` (the SMTP
   group commit's shape), and ``Archive.ingest_many`` in batches of 100 with the CPU part
   on two threads (the import's and the inbound sync's shape).  Messages per second of
   wall time, N different messages each.
2. **Search** at ``--n`` archived messages: the corpus is generated FAST by writing the
   index rows directly (``index.write_rows`` on already-extracted text, no MIME, no blobs,
   no archive records) — that is corpus generation, not the ingest path.  Then a set of
   typical auditor queries, each run with several values, page 1 of 20, newest first,
   through ``gateway.archive.search.search``.  p50/p95 over all runs and per query.

Corpus: 60 employees, 3000 customers with company domains (skewed: the biggest has ~7 % of all
mail), bodies log-normally sized (median ≈ 1.2 KB of text, long tail to 20 KB), 45 % Chinese,
15 % mixed, 40 % English,
timestamps spread over two years.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.archive import index  # noqa: E402
from gateway.archive.index import Extracted  # noqa: E402

ZH_WORDS = ("报价单 样品 付款 发票 合同 订单 交货期 运费 海运 空运 集装箱 提单 信用证 定金 尾款 工厂 质检 包装 "
            "纸箱 托盘 价格 折扣 数量 型号 规格 颜色 材料 认证 展会 客户 经理 采购 供应商 物流 清关 关税 汇率 美元 "
            "人民币 欧元 样品费 形式发票 装箱单 原产地证 检验 延期 退货 投诉 质量 问题 确认 回复 附件 请查收 谢谢 "
            "您好 最新 安排 生产 船期 目的港 深圳 宁波 上海 广州 汉堡 鹿特丹 洛杉矶 迪拜 拉各斯 单价 总价 税 单"
            ).split()
EN_WORDS = ("quotation price list sample payment invoice contract order delivery freight sea air container bill "
            "of lading letter credit deposit balance factory inspection packing carton pallet discount quantity "
            "model specification colour material certificate fair customer manager purchase supplier logistics "
            "customs duty exchange rate dollar euro proforma origin delay return complaint quality issue confirm "
            "reply attached please find thanks regards best dear hello latest arrange production shipment "
            "destination port the and for with we you our your this that will be is are to a in on at by from "
            "LED lamp panel light driver cable solar inverter battery pump valve motor").split()
PRODUCTS = ("LED灯具 LED panel 太阳能板 solar inverter 锂电池 lithium battery 水泵 water pump 阀门 ball valve "
            "电机 motor").split()


class Corpus:
    def __init__(self, seed: int = 7) -> None:
        self.rnd = random.Random(seed)
        self.employees = [(f"sales{i}@acme.test", f"Sales {i}", f"销售{i}号") for i in range(60)]
        self.customers = [(f"Customer {i} Trading", f"cust{i}.example", f"buyer{i}") for i in range(3000)]
        self.start = dt.datetime(2024, 11, 1)
        self.span = 2 * 365 * 86400

    def _text(self, words: tuple[str, ...] | list[str], chars: int, sep: str) -> str:
        out, size = [], 0
        rnd = self.rnd
        while size < chars:
            w = rnd.choice(words)
            out.append(w)
            size += len(w) + len(sep)
            if rnd.random() < 0.08:
                out.append("。\n" if sep == "" else ".\n")
            if rnd.random() < 0.01:
                out.append(f"PO-{rnd.randrange(100000, 999999)}")
        return sep.join(out)

    def extracted(self, i: int) -> tuple[dt.datetime, str, int, Extracted]:
        rnd = self.rnd
        emp_i = rnd.randrange(len(self.employees))
        emp = self.employees[emp_i]
        cust = self.customers[int(len(self.customers) * rnd.random() ** 3)]  # skewed: #1 has ~7 % of all mail
        lang = rnd.random()
        body_chars = min(int(rnd.lognormvariate(7.1, 0.8)), 20000)
        if lang < 0.45:
            subject = self._text(ZH_WORDS, rnd.randrange(6, 20), "")
            body = self._text(ZH_WORDS, body_chars // 3, "")  # CJK: ~3 bytes a character
        elif lang < 0.6:
            subject = self._text(ZH_WORDS, 6, "") + " " + self._text(EN_WORDS, 20, " ")
            body = self._text(ZH_WORDS, body_chars // 6, "") + "\n" + self._text(EN_WORDS, body_chars // 2, " ")
        else:
            subject = self._text(EN_WORDS, rnd.randrange(15, 60), " ")
            body = self._text(EN_WORDS, body_chars, " ")
        if rnd.random() < 0.3:
            subject += " " + rnd.choice(PRODUCTS)
        subject = " ".join(subject.split())
        outbound = rnd.random() < 0.55
        contact = f"{cust[2]}@{cust[1]}"
        ours = f"{emp[2]} <{emp[0]}>"
        theirs = f"{cust[2].title()} <{contact}>"
        ex = Extracted(subject=subject, sender=ours if outbound else theirs, rcpt=theirs if outbound else ours,
                       body=body, from_addrs=[emp[0] if outbound else contact],
                       to_addrs=[contact if outbound else emp[0]])
        if rnd.random() < 0.3:
            ex.has_attachment = True
            ex.attnames = rnd.choice(["形式发票", "报价单", "PI", "Invoice", "Packing list", "装箱单", "spec"]) + \
                f"-{rnd.randrange(1000, 9999)}.{rnd.choice(['pdf', 'xlsx', 'docx', 'jpg'])}"
        when = self.start + dt.timedelta(seconds=self.span * i / self.n + rnd.random())
        return when, "out" if outbound else "in", emp_i + 1, ex

    def raw(self, i: int) -> tuple[bytes, str, int]:
        """A raw MIME message for the ingest measurement."""
        from email.message import EmailMessage

        when, direction, emp, ex = self.extracted(i)
        msg = EmailMessage()
        msg["Subject"] = ex.subject
        msg["From"] = ex.sender.replace("\n", ", ")
        msg["To"] = ex.rcpt.replace("\n", ", ")
        msg["Message-ID"] = f"<bench-{i}-{self.rnd.random()}@acme.test>"
        msg["Date"] = when.strftime("%a, %d %b %Y %H:%M:%S +0000")
        msg.set_content(ex.body)
        if ex.has_attachment:
            size = int(self.rnd.uniform(20_000, 400_000))
            msg.add_attachment(os.urandom(size), maintype="application", subtype="octet-stream",
                               filename=ex.attnames)
        return msg.as_bytes(), direction, emp


# -- databases -------------------------------------------------------------------------------------


def setup_db(backend: str, workdir: Path, stack: list) -> str:
    if backend == "sqlite":
        return "sqlite:///" + str(workdir / "bench.db")
    from tests.harness.postgres import PostgresServer

    workdir.chmod(0o755)  # the postgres account must reach its data directory below it
    server = PostgresServer(workdir / "pg")
    server.start()
    stack.append(server.stop)
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname="postgres")
    conn.autocommit = True
    # a UTF-8 LC_CTYPE so that pg_trgm indexes CJK characters (see gateway/archive/README-search)
    conn.cursor().execute("CREATE DATABASE bench TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' "
                          "LC_CTYPE 'C.UTF-8'")
    conn.close()
    return server.url_for("bench")


def seed_directory(corpus: Corpus) -> None:
    from gateway.db.models import CompanyDomain, Customer, Employee, database

    with database.atomic():
        Employee.insert_many([{"email": e, "name": n, "roles": "salesperson"}
                              for e, n, _ in corpus.employees]).execute()
        for start in range(0, len(corpus.customers), 500):
            chunk = corpus.customers[start:start + 500]
            Customer.insert_many([{"name": name} for name, _, _ in chunk]).execute()
        ids = {c.name: c.id for c in Customer.select(Customer.id, Customer.name)}
        rows = [{"customer": ids[name], "domain": domain} for name, domain, _ in corpus.customers]
        for start in range(0, len(rows), 500):
            CompanyDomain.insert_many(rows[start:start + 500]).execute()


def _make_rows(args: tuple[int, int, int]) -> list[tuple]:
    """Worker process: one batch of index rows (text generated, short grams computed)."""
    n, start, stop = args
    corpus = Corpus(seed=7 * 1_000_003 + start)
    corpus.n = n
    rows = []
    for i in range(start, stop):
        when, direction, emp, ex = corpus.extracted(i)
        rid = 10_000_000 + i  # clear of the ingested records
        rows.append(index.doc_row(index.docid_for(when, rid), rid, when, direction, emp, ex, with_grams=True))
    return rows


def generate(corpus: Corpus, n: int, batch: int = 2000) -> float:
    """The search corpus: rows made in a worker process (the second core), written here."""
    import multiprocessing

    from gateway.db import is_postgres
    from gateway.db.models import database

    corpus.n = n
    db = database.obj
    if not is_postgres():
        db.execute_sql("PRAGMA synchronous=OFF")
        db.execute_sql("PRAGMA cache_size=-1000000")  # 1 GB of page cache while loading
    t0 = time.perf_counter()
    jobs = [(n, start, min(n, start + batch)) for start in range(0, n, batch)]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pending = collections.deque(pool.apply_async(_make_rows, (job,)) for job in jobs[:3])
        for k in range(len(jobs)):
            rows = pending.popleft().get()
            if k + 3 < len(jobs):  # at most three batches ahead: memory stays flat
                pending.append(pool.apply_async(_make_rows, (jobs[k + 3],)))
            with db.atomic():
                index.write_rows(rows)
            done = jobs[k][1] + len(rows)
            if k and k % 10 == 0:
                print(f"  generated {done:,} ({done / (time.perf_counter() - t0):,.0f}/s)", flush=True)
    if not is_postgres():
        db.execute_sql("INSERT INTO archivefts(archivefts) VALUES('optimize')")
        db.execute_sql("INSERT INTO archivegrams(archivegrams) VALUES('optimize')")
        db.execute_sql("PRAGMA synchronous=FULL")
        db.execute_sql("PRAGMA cache_size=-2000")
        db.execute_sql("ANALYZE")
    else:
        db.execute_sql("VACUUM ANALYZE")
    return time.perf_counter() - t0


def queries(corpus: Corpus, rnd: random.Random) -> list[tuple[str, str]]:
    cust = rnd.randrange(50)
    c_name, c_domain, c_user = corpus.customers[cust]
    emp = corpus.employees[rnd.randrange(len(corpus.employees))][0]
    month = dt.date(2025, rnd.randrange(1, 13), 1)
    zh = rnd.choice(["报价单", "形式发票", "交货期", "信用证", "集装箱", "原产地证"])
    zh2 = rnd.choice(["样品", "付款", "发票", "合同", "订单", "运费"])
    en = rnd.choice(["quotation", "invoice", "shipment", "inspection", "container", "proforma"])
    return [
        ("common Chinese word (3+ chars)", zh),
        ("two-character Chinese word", zh2),
        ("one Chinese character", rnd.choice(["单", "税"])),
        ("common English word", en),
        ("English phrase", '"price list"'),
        ("rare order number", f"PO-{rnd.randrange(100000, 999999)}"),
        ("from: a customer address", f"from:{c_user}@{c_domain}"),
        ("customer: correspondence", f"customer:{cust + 1}"),
        ("customer: + Chinese term", f"customer:{cust + 1} {zh2}"),
        ("subject: + date range", f"subject:{en} after:{month} before:{month.replace(day=28)}"),
        ("has:attachment direction:in + term", f"has:attachment direction:in {zh}"),
        ("employee: + term", f"employee:{emp} {en}"),
        ("two terms, Chinese and English", f"{zh} {en}"),
        ("no match", "zzqxv"),
    ]


def bench_search(corpus: Corpus, reps: int) -> dict[str, list[float]]:
    from gateway.archive.search import search

    rnd = random.Random(99)
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        for label, text in queries(corpus, rnd):
            t0 = time.perf_counter()
            search(text, page=1, per_page=20)
            times.setdefault(label, []).append((time.perf_counter() - t0) * 1000)
    return times


def bench_ingest(n: int, batch: int, workdir: Path) -> tuple[float, float]:
    """(msg/s through Archive.record one by one in transactions of ``batch``, like the SMTP
    group commit; msg/s through Archive.ingest_many in batches with the CPU part on 2 threads,
    like the import and the inbound sync)."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.archive import Archive, Capture
    from gateway.db.models import database

    corpus = Corpus(seed=11)
    corpus.n = 2 * n
    msgs = [corpus.raw(i) for i in range(2 * n)]
    first, second = msgs[:n], msgs[n:]
    total = sum(len(m[0]) for m in msgs) / 2
    spent = [0.0]
    real = index.index_record

    def timed(record: object, raw: bytes) -> None:
        t = time.perf_counter()
        real(record, raw)
        spent[0] += time.perf_counter() - t

    index.index_record = timed
    archive = Archive(workdir / "blobs", workdir / "archive.key")
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        with database.atomic():
            for raw, direction, emp in first[start:start + batch]:
                archive.record(raw, direction="outbound" if direction == "out" else "inbound", verdict="accepted",
                               employee_id=emp)
    one = time.perf_counter() - t0
    index.index_record = real
    print(f"ingest, Archive.record one by one ({batch} per transaction): {n} messages, "
          f"{total / n / 1024:.0f} KiB average, {one:.1f} s → {n / one:,.0f} msg/s ({total / one / 1e6:.1f} MB/s); "
          f"full-text indexing {spent[0] / n * 1000:.2f} ms/msg ({spent[0] / one:.0%} of the time)")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, n, 100):
            chunk = second[start:start + 100]
            prepared = list(pool.map(lambda m: archive.prepare(m[0]), chunk))
            archive.ingest_many([Capture(raw=raw, place="import:eml", direction="outbound" if d == "out" else
                                         "inbound", verdict="imported", employee_id=emp)
                                 for raw, d, emp in chunk], prepared)
    many = time.perf_counter() - t0
    print(f"ingest, Archive.ingest_many (100 per batch, hash/zstd/AES on 2 threads): {n} messages, "
          f"{many:.1f} s → {n / many:,.0f} msg/s ({total / many / 1e6:.1f} MB/s)")
    return n / one, n / many


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="archived messages in the search corpus")
    ap.add_argument("--ingest", type=int, default=2000, help="messages through Archive.record (0: skip)")
    ap.add_argument("--batch", type=int, default=50, help="messages per ingest transaction")
    ap.add_argument("--reps", type=int, default=15, help="runs of each query kind")
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--workdir", help="keep the database here (default: a temporary directory)")
    args = ap.parse_args()

    from gateway.db import connect

    stack: list = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-archive-")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        url = setup_db(args.backend, workdir, stack)
        db = connect(url)
        corpus = Corpus()
        seed_directory(corpus)
        print(f"backend {args.backend}; machine: {os.cpu_count()} cores, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        rates = bench_ingest(args.ingest, args.batch, workdir) if args.ingest else None
        print(f"generating the search corpus: {args.n:,} messages (index rows written directly)", flush=True)
        secs = generate(corpus, args.n)
        print(f"  done in {secs:.0f} s ({args.n / secs:,.0f} docs/s)")
        if args.backend == "sqlite":
            size = sum(p.stat().st_size for p in workdir.glob("bench.db*"))
            print(f"  database size {size / 1e9:.2f} GB")
        bench_search(corpus, 2)  # warm the cache
        times = bench_search(corpus, args.reps)
        every = [t for ts in times.values() for t in ts]
        print(f"\nsearch at {args.n + args.ingest:,} messages, {len(every)} queries, page 1 of 20, newest first:")
        print(f"{'query':40} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for label, ts in times.items():
            print(f"{label:40} {pct(ts, 50):8.1f} {pct(ts, 95):8.1f} {max(ts):8.1f}")
        p95 = pct(every, 95)
        print(f"{'ALL':40} {pct(every, 50):8.1f} {p95:8.1f} {max(every):8.1f}")
        print(f"target search p95 ≤ 300 ms at 1M: {'met' if p95 <= 300 else 'NOT met'} at {args.n:,} "
              f"({p95:.1f} ms = {p95 / 300:.2f} × target; mean {statistics.mean(every):.1f} ms)")
        if rates:
            for label, rate in zip(("Archive.record", "Archive.ingest_many"), rates, strict=True):
                print(f"target ingest ≥ 500 msg/s: {label} {rate:,.0f} msg/s = {rate / 500:.2f} × target "
                      f"({'met' if rate >= 500 else 'NOT met'})")
        print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        db.close()
    finally:
        for stop in reversed(stack):
            stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
