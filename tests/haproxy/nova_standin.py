"""A stand-in for the rest of Nova behind HAProxy (tests/haproxy.rs only): its metadata API and its
compute API, plain HTTP on 127.0.0.1, as deploy/haproxy.cfg's nova_metadata and nova_api
backends.

Usage: nova_standin.py SEEN_FILE   (prints "METADATA_PORT COMPUTE_PORT", then serves until killed)

Every request it receives is appended to SEEN_FILE ("metadata GET /path" or "compute GET /path"),
so the test can prove that no password request ever reached Nova. Compute: the version documents
(Nova's range, 2.1 to 2.104, the document microversion negotiation reads) and a server document for
any id; metadata: a meta_data.json; anything else 404. A password path answers 200
"NOVA-PASSWORD-HANDLER" so a leak would be plain to see.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN = sys.argv[1]
LOCK = threading.Lock()


def version_doc(host):
    return {"id": "v2.1", "status": "CURRENT", "version": "2.104", "min_version": "2.1",
            "updated": "2013-07-23T11:33:21Z",
            "links": [{"rel": "self", "href": "https://%s/v2.1/" % host}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.compute+json;version=2.1"}]}


def handler(kind):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body, content_type="application/json", extra=()):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Stand-In", "nova-" + kind)
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            with LOCK, open(SEEN, "a") as f:
                f.write("%s %s %s\n" % (kind, self.command, self.path))
            path = self.path.split("?")[0]
            host = self.headers.get("Host", "localhost")
            if "password" in path.lower():
                return self.answer(200, "NOVA-PASSWORD-HANDLER", "text/plain")
            if kind == "metadata":
                if path == "/openstack/latest/meta_data.json":
                    return self.answer(200, json.dumps({"uuid": "stand-in"}))
                return self.answer(404, "not found", "text/plain")
            version = self.headers.get("X-OpenStack-Nova-API-Version", "2.1")
            mv = [("OpenStack-API-Version", "compute " + version),
                  ("X-OpenStack-Nova-API-Version", version),
                  ("Vary", "OpenStack-API-Version, X-OpenStack-Nova-API-Version")]
            if path in ("/", ""):
                return self.answer(200, json.dumps({"versions": [version_doc(host)]}), extra=mv)
            if path in ("/v2.1", "/v2.1/"):
                return self.answer(200, json.dumps({"version": version_doc(host)}), extra=mv)
            parts = path.strip("/").split("/")
            if len(parts) in (3, 4) and parts[0] == "v2.1" and parts[-2] == "servers":
                sid = parts[-1]
                server = {"id": sid, "name": "vm-" + sid[:8], "status": "ACTIVE", "tenant_id": "project-a",
                          "metadata": {}, "links": []}
                return self.answer(200, json.dumps({"server": server}), extra=mv)
            return self.answer(404, json.dumps({"itemNotFound": {"code": 404, "message": "stand-in"}}), extra=mv)

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

        def log_message(self, *args):
            pass

    return Handler


def main():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler(kind)) for kind in ("metadata", "compute")]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("%d %d" % tuple(s.server_address[1] for s in servers), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
