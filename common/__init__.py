"""Shared parts of zswarm: segments and manifests, the wire protocol, errors, config loading."""
