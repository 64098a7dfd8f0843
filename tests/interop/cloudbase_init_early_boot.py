"""cloudbase-init boots before Nova's create notification has registered its instance.

Usage: cloudbase_init_early_boot.py METAPASS_PORT INSTANCE_ID TENANT_ID REPO_ROOT

The real HttpService, with cloudbase-init's default retries (retry_count 5, every 4 s), behind the
Neutron stand-in: it reads "no password" (an empty 200), posts, gets 503 (passed through by
Neutron) until the test registers the instance, then succeeds. Prints the statuses metapass
answered and OK.
"""

import base64
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloudbaseinit.metadata.services import httpservice
from cloudbaseinit.plugins.common import setuserpassword

from interop_common import configure_cloudbase
from neutron_proxy import dev_proxy

CONF = httpservice.CONF


def main():
    port, instance_id, tenant_id, repo = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    proxy, ca = dev_proxy(port, instance_id, tenant_id, repo)
    with proxy:
        configure_cloudbase(CONF, proxy.port, ca)
        assert CONF.retry_count == 5 and CONF.retry_count_interval == 4, "defaults"

        service = httpservice.HttpService()
        assert service.is_password_set is False, "an unregistered instance has no password"
        print("ready", flush=True)

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ssh_pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        password = "Early-Passw0rd!"
        enc = setuserpassword.SetUserPasswordPlugin()._encrypt_password(ssh_pub, password)
        assert service.post_password(enc) is True, "the post must succeed once registered"
        stored = service._get_data(service._get_password_path())
        assert key.decrypt(base64.b64decode(stored), padding.PKCS1v15()).decode() == password
        print("metapass answered", proxy.seen)
        assert 503 in proxy.seen, "the first post was early"
    print("OK")


if __name__ == "__main__":
    main()
