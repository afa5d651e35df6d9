"""A zswarm peer: downloads verified segments from the swarm and serves what it holds."""

import logging

from peer.config import PeerConfig
from peer.driver import GetFuture
from peer.service import Peer
from peer.transfer import GetResult, Progress

# A library logs and leaves printing to the application: without this, records of WARNING and above
# would reach stderr through logging's last-resort handler in scripts that configure no logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["GetFuture", "GetResult", "Peer", "PeerConfig", "Progress"]
