"""python-novaclient (library and CLI) and openstacksdk with real Keystone sessions against metapass.

Usage: keystone_clients.py METAPASS_PORT INSTANCE_ID PROJECT_ID REPO_ROOT WORK_DIR FIXTURES_JSON

The owners authenticate with keystoneauth1's v3 password plugin against the test Keystone
(tests/keystone/keystone-up); their tokens reach metapass as X-Auth-Token and metapass validates
them with Keystone. The compute endpoint is metapass's (endpoint_override, as a catalog entry would
give it). novaclient negotiates 2.latest, openstacksdk its default. Prints one line per check and
OK at the end.
"""

import json
import os
import subprocess
import sys

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from novaclient import api_versions
from novaclient import client as nova_client
from openstack import connection

from interop_common import OwnerKey
from interop_common import guest_post as common_guest_post


def main():
    port, instance_id, project_id, repo, work, fixtures_file = sys.argv[1:7]
    with open(fixtures_file) as f:
        fixtures = json.load(f)
    ca = os.path.join(repo, "certs-dev", "ca.pem")
    base = "https://127.0.0.1:%s" % port
    compute = base + "/v2.1"
    alice = fixtures["users"]["alice"]

    def session(user):
        auth = v3.Password(auth_url=fixtures["auth_url"] + "/v3", username=user, password=fixtures["users"][user]["password"],
                           project_id=fixtures["users"][user]["project_id"], user_domain_id="default")
        return ks_session.Session(auth=auth, verify=ca)

    sess = session("alice")
    # 2.latest, negotiated as the nova CLI does it: the server's version document against
    # novaclient's own maximum (2.96 in 18.x).
    probe = nova_client.Client("2.1", session=sess, endpoint_override=compute)
    negotiated = api_versions.discover_version(probe, api_versions.APIVersion("2.latest"))
    nova = nova_client.Client(negotiated.get_string(), session=sess, endpoint_override=compute)
    print("novaclient negotiated", negotiated.get_string())
    assert negotiated.get_string() == "2.96", negotiated.get_string()
    # The guest's earlier plain-text post is cleared by the owner, so the guest can post again.
    nova.servers.clear_password(instance_id)
    assert nova.servers.get_password(instance_id) == "", "cleared"

    owner = OwnerKey(work)
    key_file = owner.file

    def guest_post(text):
        common_guest_post(base, ca, instance_id, project_id, owner.encrypt(text))

    guest_post("keystone-Passw0rd")
    assert nova.servers.get_password(instance_id, private_key=key_file) == "keystone-Passw0rd"
    print("novaclient 2.latest get_password: decrypted")
    pinned = nova_client.Client("2.96", session=sess, endpoint_override=compute)
    assert pinned.servers.get_password(instance_id, private_key=key_file) == "keystone-Passw0rd"
    print("novaclient 2.96 get_password: decrypted")

    # The nova CLI, authenticating with Keystone itself.
    cli = [os.path.join(os.path.dirname(sys.executable), "nova"),
           "--os-auth-url", fixtures["auth_url"] + "/v3", "--os-username", "alice",
           "--os-password", alice["password"], "--os-project-id", alice["project_id"],
           "--os-user-domain-id", "default", "--os-cacert", ca, "--os-endpoint-override", compute,
           "--os-compute-api-version", "2.latest", "get-password", instance_id, key_file]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "keystone-Passw0rd", out.stdout
    print("nova get-password CLI with Keystone: decrypted")

    # openstacksdk with its default microversion negotiation, on a reader's session.
    conn = connection.Connection(session=session("rita"), compute_endpoint_override=compute)
    blob = conn.compute.get_server_password(instance_id)
    assert owner.decrypt(blob) == "keystone-Passw0rd"
    print("openstacksdk get_server_password (reader): decrypted")
    try:
        conn.compute.clear_server_password(instance_id)
    except Exception as exc:  # openstack.exceptions.ForbiddenException
        assert "403" in str(exc) or getattr(exc, "status_code", None) == 403, exc
    else:
        raise AssertionError("a reader must not clear")
    print("openstacksdk clear_server_password (reader): 403")
    member = connection.Connection(session=sess, compute_endpoint_override=compute)
    member.compute.clear_server_password(instance_id)
    assert member.compute.get_server_password(instance_id) == "", "cleared"
    print("openstacksdk clear_server_password (member): cleared")

    # Catalog forms: the legacy endpoint with the project id in it, and a path prefix.
    guest_post("catalog-Passw0rd")
    legacy = nova_client.Client("2.96", session=sess, endpoint_override=compute + "/" + alice["project_id"])
    assert legacy.servers.get_password(instance_id, private_key=key_file) == "catalog-Passw0rd"
    print("novaclient on /v2.1/{project_id}: decrypted")
    prefixed = base + "/compute/v2.1"
    with_prefix = nova_client.Client("2.96", session=sess, endpoint_override=prefixed)
    assert with_prefix.servers.get_password(instance_id, private_key=key_file) == "catalog-Passw0rd"
    sdk = connection.Connection(session=sess, compute_endpoint_override=prefixed)
    blob = sdk.compute.get_server_password(instance_id)
    assert owner.decrypt(blob) == "catalog-Passw0rd"
    sdk.compute.clear_server_password(instance_id)
    assert sdk.compute.get_server_password(instance_id) == "", "cleared"
    print("novaclient and openstacksdk under /compute/v2.1: decrypted and cleared")
    print("OK")


if __name__ == "__main__":
    main()
