"""gunicorn entry point for a real Keystone in the tests (tests/keystone/keystone-up).

Keystone's application parses sys.argv as oslo.config options; gunicorn's own arguments are not
Keystone's, so they are cleared before the application is built. The configuration comes from
OS_KEYSTONE_CONFIG_FILES, which keystone-up sets.
"""

import sys

sys.argv = sys.argv[:1]

from keystone.server import wsgi  # noqa: E402

application = wsgi.initialize_public_application()
