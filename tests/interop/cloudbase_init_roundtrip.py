"""Drives cloudbase-init's real HttpService against metapass through a Neutron-like proxy.

Usage: cloudbase_init_roundtrip.py METAPASS_PORT INSTANCE_ID TENANT_ID REPO_ROOT

The guest posts an RSA-encrypted (PKCS#1 v1.5) password with the real plugin code, reads it back,
decrypts it with the private key, and a second post must fail with 409. Prints OK on success.
"""

import base64
import sys

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Only these three cloudbase-init modules are imported: the metadata service, the password
# plugin, and the crypt helper the plugin encrypts with.
from cloudbaseinit.metadata.services import httpservice
from cloudbaseinit.plugins.common import setuserpassword
from cloudbaseinit.utils import crypt

from interop_common import configure_cloudbase
from neutron_proxy import dev_proxy

CONF = httpservice.CONF


def main():
    port, instance_id, tenant_id, repo = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    proxy, ca = dev_proxy(port, instance_id, tenant_id, repo)
    with proxy:
        configure_cloudbase(CONF, proxy.port, ca)
        CONF.set_override("retry_count", 0)

        service = httpservice.HttpService()
        assert service.is_password_set is False, "fresh instance must have no password"

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ssh_pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        password = "Interop-Passw0rd!"
        plugin = setuserpassword.SetUserPasswordPlugin()
        enc_password_b64 = plugin._encrypt_password(ssh_pub, password)
        assert service.post_password(enc_password_b64) is True, "first post must succeed"

        assert service.is_password_set is True, "password must read back as set"
        stored = service._get_data(service._get_password_path())
        assert stored == enc_password_b64, "stored blob must be exactly what was posted"
        decrypted = key.decrypt(base64.b64decode(stored), padding.PKCS1v15()).decode()
        assert decrypted == password, "the owner's private key must recover the password"

        other = crypt.CryptManager().public_encrypt(ssh_pub, "another")
        try:
            service.post_password(other)
        except requests.HTTPError as exc:
            assert exc.response.status_code == 409, "second post: %d" % exc.response.status_code
        else:
            raise AssertionError("a second post must fail with 409")
        assert service._get_data(service._get_password_path()) == enc_password_b64
    print("OK")


if __name__ == "__main__":
    main()
