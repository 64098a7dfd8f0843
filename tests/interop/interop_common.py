"""What the interop scripts share: the owner's RSA key pair, the guest's encrypted post through
signed proxy headers, and cloudbase-init's configuration behind the Neutron stand-in."""

import base64
import hashlib
import hmac
import os

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PROXY_SECRET = b"dev-metadata-proxy-secret"


class OwnerKey:
    """The owner's RSA key: the private half in WORK_DIR/owner-key.pem (mode 0600, as the nova
    CLI and novaclient read it), the public half for the guest to encrypt with."""

    def __init__(self, work):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.file = os.path.join(work, "owner-key.pem")
        with open(self.file, "wb") as f:
            f.write(self.key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
        os.chmod(self.file, 0o600)

    def encrypt(self, text):
        """The base64 blob a guest agent posts (PKCS#1 v1.5, as cloudbase-init encrypts)."""
        return base64.b64encode(self.key.public_key().encrypt(text.encode(), padding.PKCS1v15())).decode()

    def decrypt(self, blob):
        return self.key.decrypt(base64.b64decode(blob), padding.PKCS1v15()).decode()


def guest_post(base, ca, instance_id, tenant, blob, cert=None, forwarded_for=None):
    """Posts `blob` as the metadata proxy does for `instance_id` of `tenant`; asserts 200."""
    sig = hmac.new(PROXY_SECRET, instance_id.encode(), hashlib.sha256).hexdigest()
    headers = {"X-Instance-ID": instance_id, "X-Tenant-ID": tenant, "X-Instance-ID-Signature": sig}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    resp = requests.post(base + "/openstack/2013-04-04/password", data=blob, headers=headers, verify=ca,
                         cert=cert)
    assert resp.status_code == 200, (resp.status_code, resp.text)


def configure_cloudbase(conf, proxy_port, ca):
    """cloudbase-init's OpenStack HTTP service pointed at the Neutron stand-in on `proxy_port`."""
    conf([], project="cloudbase-init")
    conf.set_override("metadata_base_url", "https://127.0.0.1:%d/" % proxy_port, group="openstack")
    conf.set_override("add_metadata_private_ip_route", False, group="openstack")
    conf.set_override("https_ca_bundle", ca, group="openstack")
