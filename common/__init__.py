"""Shared parts of zswarm: segments and manifests, the wire protocol, errors, config loading."""

import logging

# A library logs and leaves printing to the application: without this, records of WARNING and above
# would reach stderr through logging's last-resort handler in scripts that configure no logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
