"""The owner clients through HAProxy's compute frontend (tests/haproxy.rs), where the version
document and GET /servers/{id} come from Nova (the stand-in) and os-server-password from metapass.

Usage: haproxy_owner_clients.py METADATA_URL COMPUTE_URL INSTANCE_ID REPO_ROOT WORK_DIR

The guest posts through HAProxy's metadata frontend with the metadata agent's client certificate
and signed headers; novaclient negotiates 2.latest (against Nova's document: 2.96, novaclient's
maximum), the nova CLI does the same, openstacksdk negotiates its default. Prints OK at the end.
"""

import base64
import hashlib
import hmac
import os
import subprocess
import sys

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from novaclient import api_versions
from novaclient import client as nova_client
from openstack import connection
from openstack.config import cloud_region

TOKEN = "dev-token-project-a"


def main():
    metadata, compute, instance_id, repo, work = sys.argv[1:6]
    certs = os.path.join(repo, "certs-dev")
    ca = os.path.join(certs, "ca.pem")
    agent_cert = (os.path.join(certs, "proxy.pem"), os.path.join(certs, "proxy.key"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = os.path.join(work, "owner-key.pem")
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    os.chmod(key_file, 0o600)

    blob = base64.b64encode(key.public_key().encrypt(b"haproxy-Passw0rd", padding.PKCS1v15())).decode()
    sig = hmac.new(b"dev-metadata-proxy-secret", instance_id.encode(), hashlib.sha256).hexdigest()
    headers = {"X-Instance-ID": instance_id, "X-Tenant-ID": "project-a", "X-Instance-ID-Signature": sig,
               "X-Forwarded-For": "10.0.0.42"}
    resp = requests.post(metadata + "/openstack/2013-04-04/password", data=blob, headers=headers,
                         verify=ca, cert=agent_cert)
    assert resp.status_code == 200, (resp.status_code, resp.text)

    sess = ks_session.Session(auth=token_endpoint.Token(endpoint=compute + "/v2.1", token=TOKEN), verify=ca)
    probe = nova_client.Client("2.1", session=sess)
    negotiated = api_versions.discover_version(probe, api_versions.APIVersion("2.latest"))
    assert negotiated.get_string() == "2.96", negotiated.get_string()
    nova = nova_client.Client(negotiated.get_string(), session=sess)
    assert nova.servers.get_password(instance_id, private_key=key_file) == "haproxy-Passw0rd"
    print("novaclient 2.latest (2.96) through HAProxy: decrypted")

    cli = [os.path.join(os.path.dirname(sys.executable), "nova"),
           "--os-auth-type", "admin_token", "--os-endpoint", compute + "/v2.1", "--os-token", TOKEN,
           "--os-cacert", ca, "--os-compute-api-version", "2.latest", "get-password", instance_id, key_file]
    env = dict(os.environ, OS_PROJECT_ID="project-a", OS_AUTH_URL=compute + "/not-contacted")
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "haproxy-Passw0rd", out.stdout
    print("nova get-password CLI through HAProxy: decrypted")

    conn = connection.Connection(config=cloud_region.from_session(sess))
    got = conn.compute.get_server_password(instance_id)
    assert key.decrypt(base64.b64decode(got), padding.PKCS1v15()).decode() == "haproxy-Passw0rd"
    conn.compute.clear_server_password(instance_id)
    assert conn.compute.get_server_password(instance_id) == "", "cleared"
    print("openstacksdk through HAProxy: read and cleared")
    print("OK")


if __name__ == "__main__":
    main()
