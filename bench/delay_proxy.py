#!/usr/bin/env python3
"""A TCP proxy that adds a fixed one-way delay in each direction (netem is not available
on every test machine). Usage: delay_proxy.py LISTEN_PORT TARGET_HOST:PORT DELAY_MS.
Each chunk read is forwarded DELAY_MS after it arrived, in order; bandwidth is not
limited. Serves connections until killed."""
import socket, sys, threading, time, collections

def pump(src, dst, delay):
    q = collections.deque()
    cv = threading.Condition()
    done = [False]
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

def main():
    port, target, ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, tport = target.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(8)
    while True:
        c, _ = ls.accept()
        try:
            u = socket.create_connection((host, int(tport)))
        except OSError:
            c.close()
            continue
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(c, u, ms / 1000), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, ms / 1000), daemon=True).start()

main()
