#!/usr/bin/env python3
"""The spool rows of a bench/run.sh results file against sync hubgate, as markdown on stdout.

    python3 bench/spool_report.py bench/results/latest.jsonl [PG_CORE]

`loadgen report` compares the SQLite spool row with HAProxy and does not know the spool-pg row;
this section compares both spool rows with hubgate's synchronous keep-alive 1 KiB row of the
same run, repetition by repetition (they run back to back), and adds the readings bench/run.sh
takes around each spool row's timed window ("spoolstat" lines): CPU of hubgate and of
PostgreSQL, transactions, WAL flushes. Every figure: median of the repetitions (min–max).
"""
import json
import math
import statistics
import sys

ROWS = [
    ("ka1k", "hubgate", "sync (forwarded before the 200)"),
    ("spool1k", "hubgate-spool", "spool, SQLite (`synchronous=FULL`)"),
    ("spool-pg", "hubgate-spool-pg", "spool, PostgreSQL (`synchronous_commit=on`)"),
]
TICK_US = 10_000  # /proc/PID/stat ticks are 1/100 s


def fnum(x, d=0):
    if x is None or not math.isfinite(x):
        return "–"
    if d == 0 and abs(x) >= 10_000:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.{d}f}"


def finite(v):
    return [x for x in v if x is not None and math.isfinite(x)]


def med(v):
    v = finite(v)
    return statistics.median(v) if v else float("nan")


def mr(v, d=0):
    v = finite(v)
    if not v:
        return "–"
    return f"{fnum(statistics.median(v), d)} ({fnum(min(v), d)}–{fnum(max(v), d)})"


def num(r, k):
    x = r.get(k)
    return float(x) if isinstance(x, (int, float)) else float("nan")


def main():
    path = sys.argv[1]
    pg_core = sys.argv[2] if len(sys.argv) > 2 else "0"
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    load = {}
    stat = {}
    for r in rows:
        key = (r.get("scenario"), r.get("system"), str(r.get("rep")))
        if r.get("kind") == "load":
            load[key] = r
        elif r.get("kind") == "spoolstat":
            stat[key] = r
    checks = {r.get("system"): r for r in rows if r.get("kind") == "check"}

    out = []
    w = out.append
    w("\n## Spool delivery vs sync hubgate (keep-alive POST 1 KiB)\n")
    w(
        "Same load for the three rows (keep-alive, 50 connections, one request at a time each, distinct signed 1 KiB events); "
        "hubgate on core 0 with one worker; PostgreSQL on core "
        f"{pg_core}{' (with hubgate: the gate and its database share one core)' if pg_core == '0' else ''}; "
        "load generator and upstream on core 1. Ratios are pairwise: repetition i of a spool row against repetition i of sync "
        "hubgate, run back to back. A spool row answers 200 once the event is committed; the load generator then waits for "
        "the upstream to have received every accepted event.\n"
    )
    for sys_ in ("hubgate-spool", "hubgate-spool-pg"):
        c = checks.get(sys_)
        if c is not None:
            w(f"- admission checks, {sys_}: {'pass (exact body delivered to the upstream)' if c.get('ok') else '**FAIL**: ' + str(c.get('failed'))}")
    w("")
    w("| row | system | req/s median (min–max) | × sync req/s (pairwise) | p50 ms | p99 ms median (min–max) | × sync p99 (pairwise) | errors (all reps) | reached the upstream, % of 200s (min) | hubgate CPU µs/req |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for sc, sys_, title in ROWS:
        runs = sorted(
            (r for (s, y, _), r in load.items() if s == sc and y == sys_),
            key=lambda r: float(r.get("rep", 0)),
        )
        if not runs:
            w(f"| {title} | {sys_} | no data | | | | | | | |")
            continue
        col = lambda k: [num(r, k) for r in runs]
        ratio, ratio99 = [], []
        for r in runs:
            b = load.get(("ka1k", "hubgate", str(r.get("rep"))))
            if b and sc != "ka1k":
                ratio.append(num(r, "rps") / num(b, "rps"))
                ratio99.append(num(r, "p99_ms") / num(b, "p99_ms"))
        summary[sc] = (ratio, ratio99)
        fr = [x * 100 for x in finite(col("forwarded_ratio"))]
        drain = med(col("drain_s"))
        reached = "not measured"
        if fr:
            lo = min(fr)
            bold = "**" if lo < 99.5 else ""
            reached = f"{bold}{fnum(statistics.median(fr), 1)} ({fnum(lo, 1)}){bold}"
            if sc != "ka1k" and math.isfinite(drain):
                reached += f", delivery finished ≤ {fnum(drain, 1)} s after the run"
        errors = sum(finite(col("errors")))
        kinds = "; ".join(r.get("error_kinds") for r in runs if r.get("error_kinds"))
        w(
            f"| {title} | {sys_} | {mr(col('rps'))} | {'1' if sc == 'ka1k' else mr(ratio, 2)} | {fnum(med(col('p50_ms')), 2)} | "
            f"{mr(col('p99_ms'), 2)} | {'1' if sc == 'ka1k' else mr(ratio99, 2)} | {fnum(errors)}{f' ({kinds})' if kinds else ''} | "
            f"{reached} | {fnum(med(col('sut_cpu_us_per_req')), 1)} |"
        )

    # Targets (from the PostgreSQL spool issue).
    w("\n| target | measured (median, min–max of the pairwise ratios) | verdict |\n|---|---|---|")
    for sc, label in (("spool-pg", "PostgreSQL spool"), ("spool1k", "SQLite spool (for comparison)")):
        if sc not in summary:
            continue
        ratio, ratio99 = summary[sc]
        for v, want, higher, what in ((ratio, 0.7, True, "req/s ≥ 0.7× sync"), (ratio99, 3.0, False, "p99 ≤ 3× sync's")):
            m = med(v)
            if not math.isfinite(m):
                verdict = "not measured"
            else:
                met = m >= want if higher else m <= want
                fv = finite(v)
                noisy = (min(fv) < want <= max(fv)) if higher else (min(fv) <= want < max(fv))
                verdict = ("met" if met else "**missed**") + (" (noise range straddles the target)" if noisy else "")
            w(f"| {label}: {what} | {mr(v, 2)}× | {verdict} |")

    # Per-event costs over the timed window.
    w("\n### Cost per accepted event (timed window)\n")
    w(
        "Read by bench/run.sh around each spool row's timed window: CPU from `/proc/PID/stat` (utime + stime; PostgreSQL = "
        "postmaster + every backend and auxiliary process, exited ones through the postmaster's cutime/cstime); events = "
        "`hubgate.events` ids handed out in the window (exact; SQLite: req/s × window); write transactions = transaction ids "
        "assigned (exact: every transaction that writes takes one, so this counts the COMMITs that must flush WAL — accepts, "
        "claims and the delivered events' DELETEs, which run during the load); `xact_commit`, `wal_sync`, `wal_write` and "
        "`wal_sync_time` from `pg_stat_database` / `pg_stat_wal` (published by each backend at most once a second, so good to "
        "about a second's activity at each end of the window). Delivered in the window = events − growth of the table. "
        "SQLite row: events per commit and per WAL flush = stored events ÷ durable commits (one fsync each), mean WAL "
        "flush = time in COMMIT ÷ durable commits, from hubgate's `/metrics` around the window.\n"
    )
    w("| row | events in window | hubgate CPU µs/event | PostgreSQL CPU µs/event | both, µs/event | delivered in window, % of accepted | write transactions per event | events per xact_commit | events per WAL flush (`wal_sync`) | events per WAL write | mean WAL flush ms | WAL KiB per event | fsync+fdatasync calls per event (perf) |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sc, sys_, title in ROWS[1:]:
        reps = sorted({k[2] for k in stat if k[0] == sc and k[1] == sys_}, key=float)
        if not reps:
            continue
        c = {k: [] for k in ("ev", "hub", "pg", "both", "deliv", "xid", "commit", "sync", "write", "syncms", "walkib", "fsync")}
        for rep in reps:
            st = stat[(sc, sys_, rep)]
            ld = load.get((sc, sys_, rep), {})
            win = num(st, "window_ns") / 1e9
            ev = num(st, "pg_events") if "pg_events" in st else num(ld, "rps") * win
            if not (ev > 0):
                continue
            per = lambda x: x / ev
            c["ev"].append(ev)
            c["hub"].append(per(num(st, "hubgate_ticks") * TICK_US))
            if "pg_ticks" in st:
                c["pg"].append(per(num(st, "pg_ticks") * TICK_US))
                c["both"].append(per((num(st, "pg_ticks") + num(st, "hubgate_ticks")) * TICK_US))
                c["deliv"].append(100 * (ev - num(st, "pg_backlog")) / ev)
                c["xid"].append(per(num(st, "pg_xids")))
                c["commit"].append(ev / num(st, "pg_xact_commit") if num(st, "pg_xact_commit") > 0 else float("nan"))
                c["sync"].append(ev / num(st, "pg_wal_sync") if num(st, "pg_wal_sync") > 0 else float("nan"))
                c["write"].append(ev / num(st, "pg_wal_write") if num(st, "pg_wal_write") > 0 else float("nan"))
                c["syncms"].append(num(st, "pg_wal_sync_ms") / num(st, "pg_wal_sync") if num(st, "pg_wal_sync") > 0 else float("nan"))
                c["walkib"].append(per(num(st, "pg_wal_bytes") / 1024))
            if "hub_commits" in st and num(st, "hub_commits") > 0:
                # SQLite: every durable commit is one WAL fsync; the counters come from
                # hubgate's /metrics (stored events, durable commits, time in COMMIT).
                commits = num(st, "hub_commits")
                c["commit"].append(num(st, "hub_stored") / commits)
                c["sync"].append(num(st, "hub_stored") / commits)
                c["syncms"].append(1000 * num(st, "hub_commit_s") / commits)
            if "fsync_calls" in st:
                c["fsync"].append(per(num(st, "fsync_calls")))
        na = "not exposed by hubgate"
        pgcol = lambda k, d: mr(c[k], d) if c[k] else (na if sys_ == "hubgate-spool" else "–")
        w(
            f"| {title} | {mr(c['ev'])} | {mr(c['hub'], 1)} | {mr(c['pg'], 1) if c['pg'] else '– (no server)'} | "
            f"{mr(c['both'], 1) if c['both'] else mr(c['hub'], 1)} | {pgcol('deliv', 1)} | {pgcol('xid', 2)} | {pgcol('commit', 2)} | "
            f"{pgcol('sync', 2)} | {pgcol('write', 2)} | {pgcol('syncms', 3)} | {pgcol('walkib', 2)} | "
            f"{mr(c['fsync'], 3) if c['fsync'] else 'not counted (BENCH_COUNT_FSYNC=1)'} |"
        )
    # Wait events of the PostgreSQL sessions, sampled three times per window.
    waits = {}
    n = 0
    for (sc, _, _), st in stat.items():
        if sc != "spool-pg" or not st.get("pg_waits"):
            continue
        for sample in st["pg_waits"].split(","):
            what, _, count = sample.rpartition("=")
            if what:
                waits[what] = waits.get(what, 0) + int(count)
        n += 3
    if waits:
        total = sum(waits.values())
        w(
            f"\nWhat the gate's PostgreSQL sessions were doing (pg_stat_activity, {n} samples over the spool-pg windows, "
            f"{total / n:.1f} sessions per sample): "
            + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in sorted(waits.items(), key=lambda kv: -kv[1]))
            + ". `Lock:object` is the database-wide lock NOTIFY takes at commit (held through the WAL flush), "
            "`IO:WALSync` a session flushing WAL, `LWLock:WALWrite` one waiting for another's flush (group commit)."
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
