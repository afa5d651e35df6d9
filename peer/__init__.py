"""A zswarm peer: downloads verified segments from the swarm and serves what it holds."""

from peer.agent import GetResult
from peer.config import PeerConfig
from peer.service import GetFuture, Peer

__all__ = ["GetFuture", "GetResult", "Peer", "PeerConfig"]
