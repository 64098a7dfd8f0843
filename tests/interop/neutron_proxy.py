"""A stand-in for the Neutron/OVN metadata proxy, for interop tests only.

It serves HTTPS on 127.0.0.1 (with the dev server certificate, so clients verify it against the dev
CA) and forwards every request to metapass exactly as neutron/agent/metadata/proxy_base.py's
_proxy_request does: the same four headers (X-Forwarded-For, X-Instance-ID, X-Tenant-ID,
X-Instance-ID-Signature = HMAC-SHA256 of the instance id with the shared secret, lowercase hex),
the method and the body, with requests. And it answers the guest as Neutron does:
- 200: metapass's Content-Type and body;
- 400, 403, 404, 409, 500, 502, 503, 504: a fresh error of that status, without metapass's body
  or headers (webob's own text; no Retry-After);
- any other status: 500 (Neutron raises "Unexpected response code" and answers 500);
- metapass unreachable: 503.
So tests see what a guest behind the real proxy sees.
"""

import hashlib
import hmac
import http.server
import os
import ssl
import threading

import requests

PASSED_THROUGH = (400, 403, 404, 409, 500, 502, 503, 504)
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


def neutron_answer(status):
    """The status Neutron answers the guest for metapass's `status` (200 aside)."""
    return status if status in PASSED_THROUGH else 500


class NeutronProxy:
    def __init__(self, upstream_port, instance_id, tenant_id, secret, ca_file, cert_file, key_file):
        signature = hmac.new(secret.encode(), instance_id.encode(), hashlib.sha256).hexdigest()
        headers_to_send = {
            "X-Forwarded-For": "10.0.0.42",
            "X-Instance-ID": instance_id,
            "X-Tenant-ID": tenant_id,
            "X-Instance-ID-Signature": signature,
        }
        upstream = "https://127.0.0.1:%d" % upstream_port
        self.seen = []  # metapass's statuses, in order

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status, content_type, body):
                self.send_response(status, REASONS.get(status))
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    resp = requests.request(method=self.command, url=upstream + self.path,
                                            headers=headers_to_send, data=body, verify=ca_file,
                                            timeout=60)
                except requests.ConnectionError:
                    self._answer(503, "text/plain", b"The remote metadata server is temporarily unavailable.")
                    return
                proxy.seen.append(resp.status_code)
                if resp.status_code == 200:
                    self._answer(200, resp.headers["content-type"], resp.content)
                    return
                status = neutron_answer(resp.status_code)
                text = "%d %s\n\n" % (status, REASONS[status])
                self._answer(status, "text/plain; charset=UTF-8", text.encode())

            do_GET = _forward
            do_POST = _forward
            do_PUT = _forward
            do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def dev_proxy(upstream_port, instance_id, tenant_id, repo):
    """The stand-in with the dev shared secret and the dev certificates, in front of metapass on
    `upstream_port`; returns it and the dev CA file."""
    certs = os.path.join(repo, "certs-dev")
    ca = os.path.join(certs, "ca.pem")
    proxy = NeutronProxy(int(upstream_port), instance_id, tenant_id, "dev-metadata-proxy-secret", ca,
                         os.path.join(certs, "server.pem"), os.path.join(certs, "server.key"))
    return proxy, ca
