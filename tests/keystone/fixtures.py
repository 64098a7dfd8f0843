"""Creates the test cloud's identities in a freshly bootstrapped Keystone, through its REST API.

Usage: fixtures.py AUTH_URL CA_FILE ADMIN_PASSWORD OUT_DIR

Projects project-a and project-b (Keystone generates their ids), users with Nova's roles on them,
and the metapass service user with the `service` role on the `service` project, as a real
deployment's installer would create them. Writes OUT_DIR/fixtures.json (names, ids, passwords) and
OUT_DIR/metapass-service-password (mode 0600) for metapass's `[keystone] password_file`, and an
application credential of the service user (its secret in OUT_DIR/metapass-application-credential-
secret) for `application_credential_id` / `application_credential_secret_file`.
"""

import json
import os
import secrets
import sys

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3


def main():
    auth_url, ca, admin_password, out = sys.argv[1:5]
    auth = v3.Password(auth_url=auth_url, username="admin", password=admin_password,
                       project_name="admin", user_domain_id="default", project_domain_id="default")
    sess = ks_session.Session(auth=auth, verify=ca)

    def post(path, body):
        resp = sess.post(auth_url + path, json=body, raise_exc=True)
        return resp.json()

    def find_role(name):
        roles = sess.get(auth_url + "/v3/roles", params={"name": name}).json()["roles"]
        assert roles, "bootstrap made no %s role" % name
        return roles[0]["id"]

    def project(name):
        return post("/v3/projects", {"project": {"name": name, "domain_id": "default"}})["project"]["id"]

    def user(name, password):
        body = {"user": {"name": name, "password": password, "domain_id": "default"}}
        return post("/v3/users", body)["user"]["id"]

    def grant(project_id, user_id, role):
        path = "/v3/projects/%s/users/%s/roles/%s" % (project_id, user_id, find_role(role))
        sess.put(auth_url + path, raise_exc=True)

    projects = {name: project(name) for name in ("project-a", "project-b", "service")}
    admin_project = sess.get(auth_url + "/v3/projects", params={"name": "admin"}).json()["projects"][0]["id"]
    people = {
        # name: (project, role); Keystone adds the implied roles (manager -> member -> reader).
        "alice": ("project-a", "member"),
        "rita": ("project-a", "reader"),
        "mona": ("project-a", "manager"),
        "bob": ("project-b", "member"),
        "metapass": ("service", "service"),
    }
    users = {}
    for name, (proj, role) in people.items():
        password = secrets.token_hex(16)
        uid = user(name, password)
        grant(projects[proj], uid, role)
        users[name] = {"id": uid, "password": password, "project": proj, "project_id": projects[proj],
                       "role": role}
    admin_id = sess.get(auth_url + "/v3/users", params={"name": "admin"}).json()["users"][0]["id"]
    users["admin"] = {"id": admin_id, "password": admin_password, "project": "admin",
                      "project_id": admin_project, "role": "admin"}
    projects["admin"] = admin_project

    # An application credential of the service user, the alternative to its password.
    service_auth = v3.Password(auth_url=auth_url, username="metapass", password=users["metapass"]["password"],
                               project_id=projects["service"], user_domain_id="default")
    service_sess = ks_session.Session(auth=service_auth, verify=ca)
    created = service_sess.post(auth_url + "/v3/users/%s/application_credentials" % users["metapass"]["id"],
                                json={"application_credential": {"name": "metapass-token-validation"}},
                                raise_exc=True).json()["application_credential"]
    app_secret_file = os.path.join(out, "metapass-application-credential-secret")
    fd = os.open(app_secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(created["secret"] + "\n")

    secret_file = os.path.join(out, "metapass-service-password")
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(users["metapass"]["password"] + "\n")
    fixtures = {"auth_url": auth_url, "ca_file": ca, "projects": projects, "users": users,
                "service_password_file": secret_file,
                "service_application_credential": {"id": created["id"], "secret_file": app_secret_file}}
    fd = os.open(os.path.join(out, "fixtures.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(fixtures, f, indent=2)


if __name__ == "__main__":
    main()
