"""A minimal stand-in for the Neutron/OVN metadata proxy, for interop tests only.

It serves HTTPS on 127.0.0.1 (with the dev server certificate, so clients verify it against the dev
CA) and forwards every request to metapass, adding the headers the real proxy adds: X-Instance-ID,
X-Tenant-ID, X-Instance-ID-Signature (HMAC-SHA256 of the instance id with the shared secret, lowercase
hex) and X-Forwarded-For. Like the real proxy, it passes metapass's status and body through.
"""

import hashlib
import hmac
import http.client
import http.server
import ssl
import threading


class NeutronProxy:
    def __init__(self, upstream_port, instance_id, tenant_id, secret, ca_file, cert_file, key_file):
        signature = hmac.new(secret.encode(), instance_id.encode(), hashlib.sha256).hexdigest()
        upstream_ctx = ssl.create_default_context(cafile=ca_file)
        headers_to_add = {
            "X-Instance-ID": instance_id,
            "X-Tenant-ID": tenant_id,
            "X-Instance-ID-Signature": signature,
            "X-Forwarded-For": "10.0.0.42",
        }

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPSConnection("127.0.0.1", upstream_port, context=upstream_ctx, timeout=10)
                headers = dict(headers_to_add)
                if body is not None:
                    headers["Content-Type"] = self.headers.get("Content-Type", "text/plain")
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = _forward
            do_POST = _forward

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
