"""The zswarm broker: tracker and origin of every shared file."""

from broker.config import BrokerConfig
from broker.service import Broker

__all__ = ["Broker", "BrokerConfig"]
