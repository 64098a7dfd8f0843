"""Drives python-novaclient (library and CLI) and openstacksdk against metapass.

Usage: owner_clients.py METAPASS_PORT INSTANCE_ID REPO_ROOT WORK_DIR

The guest side posts an RSA-encrypted (PKCS#1 v1.5, as guest agents do) password through signed
proxy headers; the owner reads and clears it with the real clients, authenticated by
keystoneauth1's token_endpoint plugin against https://127.0.0.1:PORT/v2.1 with the dev CA.
Prints one line per check and OK at the end.
"""

import os
import subprocess
import sys

from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from novaclient import client as nova_client
from openstack import connection
from openstack.config import cloud_region

from interop_common import OwnerKey, guest_post

TOKEN = "dev-token-project-a"


def main():
    port, instance_id, repo, work = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ca = os.path.join(repo, "certs-dev", "ca.pem")
    base = "https://127.0.0.1:%s" % port

    owner = OwnerKey(work)
    key_file = owner.file

    guest_post(base, ca, instance_id, "project-a", owner.encrypt("first-Passw0rd"))

    auth = token_endpoint.Token(endpoint=base + "/v2.1", token=TOKEN)
    sess = ks_session.Session(auth=auth, verify=ca)

    # python-novaclient, the library.
    nova = nova_client.Client("2.1", session=sess)
    clear = nova.servers.get_password(instance_id, private_key=key_file)
    assert clear == "first-Passw0rd", clear
    print("novaclient get_password: decrypted")
    nova.servers.clear_password(instance_id)
    assert nova.servers.get_password(instance_id) == "", "cleared"
    print("novaclient clear_password: cleared")

    # The guest posts again after the clear (Nova's rebuild flow).
    guest_post(base, ca, instance_id, "project-a", owner.encrypt("second-Passw0rd"))

    # The nova CLI with a token and an endpoint and no Keystone: keystoneauth's admin_token plugin
    # (token_endpoint). The CLI still insists on a project and an auth URL, which that plugin does
    # not parse as flags, so they come from the environment; neither is contacted.
    cli = [os.path.join(os.path.dirname(sys.executable), "nova"),
           "--os-auth-type", "admin_token", "--os-endpoint", base + "/v2.1", "--os-token", TOKEN,
           "--os-cacert", ca, "get-password", instance_id, key_file]
    env = dict(os.environ, OS_PROJECT_ID="project-a", OS_AUTH_URL=base + "/not-contacted")
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "second-Passw0rd", out.stdout
    print("nova get-password CLI: decrypted")

    # openstacksdk, on the same keystoneauth session.
    conn = connection.Connection(config=cloud_region.from_session(sess))
    blob = conn.compute.get_server_password(instance_id)
    plain = owner.decrypt(blob)
    assert plain == "second-Passw0rd", plain
    print("openstacksdk get_server_password: decrypted")
    conn.compute.clear_server_password(instance_id)
    assert conn.compute.get_server_password(instance_id) == "", "cleared"
    print("openstacksdk clear_server_password: cleared")
    print("OK")


if __name__ == "__main__":
    main()
