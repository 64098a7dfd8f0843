"""The owner clients through HAProxy's compute frontend (tests/haproxy.rs), where the version
document and GET /servers/{id} come from Nova (the stand-in) and os-server-password from metapass.

Usage: haproxy_owner_clients.py METADATA_URL COMPUTE_URL INSTANCE_ID REPO_ROOT WORK_DIR

The guest posts through HAProxy's metadata frontend with the metadata agent's client certificate
and signed headers; novaclient negotiates 2.latest (against Nova's document: 2.96, novaclient's
maximum), the nova CLI does the same, openstacksdk negotiates its default. Prints OK at the end.
"""

import os
import subprocess
import sys

from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from novaclient import api_versions
from novaclient import client as nova_client
from openstack import connection
from openstack.config import cloud_region

from interop_common import OwnerKey, guest_post

TOKEN = "dev-token-project-a"


def main():
    metadata, compute, instance_id, repo, work = sys.argv[1:6]
    certs = os.path.join(repo, "certs-dev")
    ca = os.path.join(certs, "ca.pem")
    agent_cert = (os.path.join(certs, "proxy.pem"), os.path.join(certs, "proxy.key"))
    owner = OwnerKey(work)
    key_file = owner.file
    guest_post(metadata, ca, instance_id, "project-a", owner.encrypt("haproxy-Passw0rd"), cert=agent_cert,
               forwarded_for="10.0.0.42")

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
    assert owner.decrypt(got) == "haproxy-Passw0rd"
    conn.compute.clear_server_password(instance_id)
    assert conn.compute.get_server_password(instance_id) == "", "cleared"
    print("openstacksdk through HAProxy: read and cleared")
    print("OK")


if __name__ == "__main__":
    main()
