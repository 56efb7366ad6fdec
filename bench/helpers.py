#!/usr/bin/env python3
"""In-process timing helpers for bench/run.sh (pairfs benchmark suite).

Each subcommand prints one JSON object on stdout. Timings use time.perf_counter around the
system call alone (no fork/exec of setfattr), so split latency is what the daemon costs.

  split-latency PATH REPS         split (timed) then release (timed), REPS times
  split-wait PATH [TIMEOUT]       split, then poll the state until `split`: background copy time
  update-wait PATH [TIMEOUT]      update, then poll the state until `split` again
  wait PATH STATE [TIMEOUT]       poll the state until STATE
  op PATH NAME                    setxattr user.pairfs.NAME (timed)
  state PATH                      the state line, parsed
  modify PATH FRAC TRACK SEED     overwrite FRAC of the file's tracks (whole tracks, random data)
  meta DIR N                      create/stat/readdir/rename/unlink of N small files
  timecmd CMD...                  wall time of a command
  fio FILE                        summary of a fio --output-format=json file
  report TSV SYS_JSON OUT_JSON    print the table, write the JSON
"""
import json
import os
import random
import statistics
import subprocess
import sys
import time

PREFIX = "user.pairfs."


def state(path):
    line = os.getxattr(path, PREFIX + "state").decode().strip()
    words = line.split()
    d = {"state": words[0] if words else "", "line": line}
    for w in words[1:]:
        if "=" in w:
            k, v = w.split("=", 1)
            d[k] = v
    return d


def setx(path, name):
    t = time.perf_counter()
    os.setxattr(path, PREFIX + name, b"")
    return time.perf_counter() - t


def wait_state(path, want, timeout, t0):
    """Polls every 2 ms until the state word is `want`; returns (seconds since t0, state)."""
    deadline = t0 + timeout
    while True:
        s = state(path)
        now = time.perf_counter()
        if s["state"] == want:
            return now - t0, s
        if now > deadline:
            raise SystemExit(f"timeout after {timeout}s waiting for {want}: {s['line']}")
        time.sleep(0.002)


def cmd_split_latency(path, reps):
    reps = int(reps)
    splits, releases = [], []
    last = None
    for _ in range(reps):
        splits.append(setx(path, "split") * 1e3)
        last = state(path)
        releases.append(setx(path, "release") * 1e3)
    out = {
        "median_ms": statistics.median(splits),
        "min_ms": min(splits),
        "max_ms": max(splits),
        "samples_ms": [round(x, 3) for x in splits],
        "release_median_ms": statistics.median(releases),
        "frozen_tracks": int(last.get("frozen_tracks", 0)) if last else 0,
        "state_after_split": last["state"] if last else "",
    }
    print(json.dumps(out))


def cmd_split_wait(path, timeout="600", op="split"):
    t0 = time.perf_counter()
    os.setxattr(path, PREFIX + op, b"")
    call = time.perf_counter() - t0
    secs, s = wait_state(path, "split", float(timeout), t0)
    print(json.dumps({"call_ms": call * 1e3, "seconds": secs,
                      "last_copied": int(s.get("last_copied", 0)),
                      "copied": int(s.get("copied", 0)),
                      "frozen_tracks": int(s.get("frozen_tracks", 0)),
                      "state": s["line"]}))


def cmd_wait(path, want, timeout="600"):
    secs, s = wait_state(path, want, float(timeout), time.perf_counter())
    print(json.dumps({"seconds": secs, "state": s["line"]}))


def cmd_op(path, name):
    print(json.dumps({"ms": setx(path, name) * 1e3, "state": state(path)["line"]}))


def cmd_state(path):
    print(json.dumps(state(path)))


def cmd_modify(path, frac, track, seed):
    frac, track = float(frac), int(track)
    size = os.path.getsize(path)
    ntracks = size // track
    k = max(1, round(ntracks * frac))
    rng = random.Random(int(seed))
    tracks = sorted(rng.sample(range(ntracks), k))
    fd = os.open(path, os.O_WRONLY)
    try:
        for t in tracks:
            os.pwrite(fd, os.urandom(track), t * track)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(json.dumps({"tracks_changed": k, "tracks_total": ntracks}))


def cmd_meta(d, n):
    """Creates N files of 1 KiB, stats them, lists the directory, renames and unlinks them."""
    n = int(n)
    os.makedirs(d, exist_ok=True)
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    data = b"x" * 1024
    res = {}

    t = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    res["create"] = time.perf_counter() - t

    t = time.perf_counter()
    for p in names:
        os.stat(p)
    res["stat"] = time.perf_counter() - t

    t = time.perf_counter()
    cnt = sum(1 for _ in os.scandir(d))
    res["readdir"] = time.perf_counter() - t
    if cnt != n:
        raise SystemExit(f"readdir saw {cnt} entries, expected {n}")

    renamed = [p + ".r" for p in names]
    t = time.perf_counter()
    for a, b in zip(names, renamed):
        os.rename(a, b)
    res["rename"] = time.perf_counter() - t

    t = time.perf_counter()
    for p in renamed:
        os.unlink(p)
    res["unlink"] = time.perf_counter() - t
    os.rmdir(d)
    print(json.dumps({k: {"seconds": v, "ops_per_s": n / v if v > 0 else 0} for k, v in res.items()}))


def cmd_timecmd(*argv):
    t = time.perf_counter()
    r = subprocess.run(list(argv))
    secs = time.perf_counter() - t
    print(json.dumps({"seconds": secs, "rc": r.returncode}))


def cmd_fio(path):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON.
    d = json.loads(text[text.index("{"):])
    j = d["jobs"][0]
    out = {}
    for side in ("read", "write"):
        s = j[side]
        if s["io_bytes"] == 0:
            continue
        pct = s["clat_ns"].get("percentile", {})
        out = {
            "side": side,
            "MBps": s["bw_bytes"] / 1e6,
            "iops": s["iops"],
            "p50_us": pct.get("50.000000", 0) / 1e3,
            "p99_us": pct.get("99.000000", 0) / 1e3,
            "p999_us": pct.get("99.900000", 0) / 1e3,
            "mean_us": s["clat_ns"]["mean"] / 1e3,
            "seconds": s["runtime"] / 1e3,
        }
    print(json.dumps(out))


def fmt(v):
    if v == "" or v is None:
        return ""
    try:
        x = float(v)
    except ValueError:
        return str(v)
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cmd_report(tsv, sysjson, outjson):
    rows = []
    with open(tsv) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            section, metric, pv, bname, bv, unit, better, note = (line.split("\t") + [""] * 8)[:8]
            r = {"section": section, "metric": metric, "unit": unit, "better": better,
                 "pairfs": float(pv) if pv not in ("", "nan") else None,
                 "baseline": bname or None,
                 "baseline_value": float(bv) if bv not in ("", "nan") else None,
                 "ratio": None, "note": note}
            if r["pairfs"] is not None and r["baseline_value"]:
                r["ratio"] = r["pairfs"] / r["baseline_value"]
            rows.append(r)
    with open(sysjson) as f:
        system = json.load(f)
    with open(outjson, "w") as f:
        json.dump({"system": system, "results": rows}, f, indent=1)
        f.write("\n")

    head = ["section", "metric", "unit", "pairfs", "baseline", "base value", "pairfs/base", "better", "note"]
    table = [head]
    for r in rows:
        table.append([r["section"], r["metric"], r["unit"], fmt(r["pairfs"]), r["baseline"] or "",
                      fmt(r["baseline_value"]), (fmt(r["ratio"]) + "x") if r["ratio"] is not None else "",
                      r["better"], r["note"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    numeric = {3, 5, 6}
    lines = []
    for i, row in enumerate(table):
        cells = [c.rjust(widths[k]) if k in numeric else c.ljust(widths[k]) for k, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join(("-" * (w + 1) + ":") if k in numeric else "-" * (w + 2)
                                        for k, w in enumerate(widths)) + "|")
    print("\n".join(lines))


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {
        "split-latency": cmd_split_latency,
        "split-wait": lambda p, t="600": cmd_split_wait(p, t, "split"),
        "update-wait": lambda p, t="600": cmd_split_wait(p, t, "update"),
        "op": cmd_op,
        "wait": cmd_wait,
        "state": cmd_state,
        "modify": cmd_modify,
        "meta": cmd_meta,
        "timecmd": cmd_timecmd,
        "fio": cmd_fio,
        "report": cmd_report,
    }.get(cmd)
    if fn is None:
        raise SystemExit(f"unknown subcommand {cmd}\n{__doc__}")
    fn(*args)


if __name__ == "__main__":
    main()
