#!/usr/bin/env python3
"""Memory of a held connection: how much the daemon's resident set grows per silent TLS
connection and per idle HTTP/2 connection (TLS done, preface and SETTINGS sent, no stream).

usage: held_connections.py METAPASS_BINARY [N]   (run from the repository root; loopback only)

Starts the daemon on the dev configuration in a scratch data directory, opens N connections of
each kind from 127.0.0.1 (closed again before the next kind; all within the first-request
timer), and prints one JSON line: RSS before and after, and KiB per connection.
"""

import json
import re
import socket
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
data = tempfile.mkdtemp(prefix="metapass-held-")
daemon = subprocess.Popen([binary, "serve", "--config", "policy/dev.toml", "--listen", "127.0.0.1:0",
                           "--data-dir", data], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = int(re.search(r":(\d+) ", daemon.stdout.readline()).group(1))


def rss_kib():
    for line in open("/proc/%d/status" % daemon.pid):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def hold(alpn):
    ctx = ssl.create_default_context(cafile="certs-dev/ca.pem")
    if alpn:
        ctx.set_alpn_protocols([alpn])
    conns = []
    for _ in range(n):
        tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
        if alpn == "h2":
            # The client preface and an empty SETTINGS frame: an HTTP/2 connection with no stream.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        conns.append(tls)
    time.sleep(2)
    return conns


try:
    time.sleep(1)
    before = rss_kib()
    held = hold(None)
    tls = rss_kib()
    for c in held:
        c.close()
    time.sleep(2)
    between = rss_kib()
    held = hold("h2")
    h2 = rss_kib()
    for c in held:
        c.close()
    print(json.dumps({"name": "held connections", "n": n, "rss_before_kib": before, "rss_tls_kib": tls,
                      "kib_per_silent_tls": round((tls - before) / n, 1), "rss_between_kib": between,
                      "rss_h2_kib": h2, "kib_per_idle_h2": round((h2 - between) / n, 1)}))
finally:
    daemon.terminate()
    daemon.wait()
    shutil.rmtree(data, ignore_errors=True)
