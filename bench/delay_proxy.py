#!/usr/bin/env python3
"""A TCP proxy that adds a fixed one-way delay in each direction (netem is not available
on every test machine), and optionally misbehaves like a bad link.

Usage: delay_proxy.py LISTEN_PORT TARGET_HOST:PORT DELAY_MS [--cut-every MS] [--down MS]
                      [--rate BYTES_PER_S] [--seed N]

Each chunk read is forwarded DELAY_MS after it arrived, in order. Options:
  --cut-every MS  cut every open connection at random moments, on average every MS
                  (bytes in flight are lost, as in a partition);
  --down MS       after each cut, refuse new connections for a random 0..MS (the link is
                  down: accepted and closed at once);
  --rate B        forward at most B bytes per second in each direction (0: no limit);
  --seed N        seed of the random moments (default: from the clock).
Cuts and refusals are printed to stderr. Serves connections until killed."""
import argparse, collections, random, socket, sys, threading, time

conns_lock = threading.Lock()
conns = set()
down_until = [0.0]

def pump(src, dst, delay, rate):
    q = collections.deque()
    cv = threading.Condition()
    def reader():
        while True:
            try:
                b = src.recv(1 << 20)
            except OSError:
                b = b""
            with cv:
                q.append((time.monotonic() + delay, b))
                cv.notify()
            if not b:
                return
    threading.Thread(target=reader, daemon=True).start()
    while True:
        with cv:
            while not q:
                cv.wait()
            t, b = q.popleft()
        now = time.monotonic()
        if t > now:
            time.sleep(t - now)
        if not b:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        try:
            dst.sendall(b)
        except OSError:
            return
        if rate > 0:
            time.sleep(len(b) / rate)

def chaos(every, down, rng):
    while True:
        time.sleep(rng.expovariate(1.0 / every))
        with conns_lock:
            cut = list(conns)
            conns.clear()
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        d = rng.uniform(0, down) if down > 0 else 0
        down_until[0] = time.monotonic() + d
        print(f"delay_proxy: cut {len(cut) // 2} connection(s), down for {d * 1000:.0f} ms",
              file=sys.stderr, flush=True)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("target")
    ap.add_argument("delay_ms", type=float)
    ap.add_argument("--cut-every", type=float, default=0, metavar="MS")
    ap.add_argument("--down", type=float, default=0, metavar="MS")
    ap.add_argument("--rate", type=float, default=0, metavar="BYTES_PER_S")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    host, tport = a.target.rsplit(":", 1)
    rng = random.Random(a.seed)
    if a.cut_every > 0:
        threading.Thread(target=chaos, args=(a.cut_every / 1000, a.down / 1000, rng),
                         daemon=True).start()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", a.port))
    ls.listen(8)
    while True:
        c, _ = ls.accept()
        if time.monotonic() < down_until[0]:
            c.close()
            continue
        try:
            u = socket.create_connection((host, int(tport)))
        except OSError:
            c.close()
            continue
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conns_lock:
            conns.update((c, u))
        threading.Thread(target=pump, args=(c, u, a.delay_ms / 1000, a.rate), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, a.delay_ms / 1000, a.rate), daemon=True).start()

main()
