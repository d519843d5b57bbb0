#!/usr/bin/python3
"""What the parts of an offload copy cost alone, in CPU seconds per GiB, and the best
direct/relay throughput ratio they allow when the copies are CPU-bound (issue 14).

A direct copy reads the source file (S), seals TLS records (S), sends them over loopback
TCP (S) and receives them (D), opens them (D) and writes a new file (D). A relayed copy does
all of that plus one more hop at the initiator: receive, open, seal, send. With every part
at its own floor (measured here, one thread each, no NBD framing, no runtime), a copy that
is CPU-bound on every core (2 cores here: three processes for the relay, two for the
direct copy) gets at best

    direct / relay = (direct floor + hop) / direct floor.

Usage: offload-floor.py SOURCE_FILE SCRATCH_DIR   (SOURCE_FILE: 1 GiB or so, as the bench's;
       SCRATCH_DIR: where a new file of that size is written and removed, the bench's folder)
The TLS suite the providers prefer is AES-128-GCM (offload-token transfer/tls.rs); its cost is
`openssl speed` for 16 KiB records, sealing and opening (the same AES-NI/VAES code paths as
ring's).
"""
import os
import re
import socket
import subprocess
import sys
import threading
import time

GIB = 1 << 30
BUF = 1 << 20


def thread_cpu():
    return time.thread_time()


def file_read(path, n):
    fd = os.open(path, os.O_RDONLY)
    mv = memoryview(bytearray(BUF))
    t = thread_cpu()
    off = 0
    while off < n:
        got = os.preadv(fd, [mv], off)
        if got == 0:
            break
        off += got
    t = thread_cpu() - t
    os.close(fd)
    return t


def file_write(path, n):
    buf = bytes(range(256)) * (BUF // 256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t = thread_cpu()
        off = 0
        while off < n:
            off += os.pwrite(fd, buf, off)
        return thread_cpu() - t
    finally:
        os.close(fd)
        os.unlink(path)


def tcp(n):
    """Sender's and receiver's CPU for n bytes over loopback TCP."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    out = {}

    def receive():
        c, _ = ls.accept()
        buf = bytearray(256 << 10)
        got = 0
        t = thread_cpu()
        while got < n:
            k = c.recv_into(buf)
            if k == 0:
                break
            got += k
        out["recv"] = thread_cpu() - t
        c.close()

    th = threading.Thread(target=receive)
    th.start()
    s = socket.create_connection(ls.getsockname())
    mv = memoryview(bytearray(BUF))
    t = thread_cpu()
    sent = 0
    while sent < n:
        sent += s.send(mv[: min(BUF, n - sent)])
    send = thread_cpu() - t
    s.close()
    th.join()
    ls.close()
    return send, out["recv"]


def aead(decrypt):
    """Seconds per GiB of AES-128-GCM on 16 KiB records (openssl speed, one core)."""
    args = ["openssl", "speed", "-seconds", "2", "-bytes", "16384"]
    if decrypt:
        args.append("-decrypt")
    args += ["-evp", "aes-128-gcm"]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    line = [l for l in r.stdout.splitlines() if l.upper().startswith("AES-128-GCM")][-1]
    kbs = float(re.findall(r"([0-9.]+)k", line)[-1])
    return GIB / (kbs * 1000.0)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, scratch = sys.argv[1], sys.argv[2]
    n = os.path.getsize(src)
    g = n / GIB
    # Medians of three, per GiB.
    med = lambda xs: sorted(xs)[len(xs) // 2]
    rd = med([file_read(src, n) for _ in range(3)]) / g
    wr = med([file_write(os.path.join(scratch, ".offload-floor.tmp"), n) for _ in range(3)]) / g
    nets = [tcp(n) for _ in range(3)]
    send, recv = med([a for a, _ in nets]) / g, med([b for _, b in nets]) / g
    seal, open_ = aead(False), aead(True)
    direct = rd + seal + send + recv + open_ + wr
    hop = recv + open_ + seal + send
    print("floors, CPU s per GiB: file read %.3f, new-file write %.3f, TCP send %.3f, "
          "TCP receive %.3f, AES-128-GCM seal %.3f, open %.3f" % (rd, wr, send, recv, seal, open_))
    print("direct copy %.3f, relay hop %.3f: CPU-bound, direct/relay is at most %.2f"
          % (direct, hop, (direct + hop) / direct))


if __name__ == "__main__":
    main()
