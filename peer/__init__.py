"""A zswarm peer: downloads verified segments from the swarm and serves what it holds."""

from peer.config import PeerConfig
from peer.driver import GetFuture
from peer.service import Peer
from peer.transfer import GetResult, Progress

__all__ = ["GetFuture", "GetResult", "Peer", "PeerConfig", "Progress"]
