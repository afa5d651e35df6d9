"""The zswarm broker: tracker and origin of every shared file."""

import logging

from broker.config import BrokerConfig
from broker.service import Broker

# A library logs and leaves printing to the application: without this, records of WARNING and above
# would reach stderr through logging's last-resort handler in scripts that configure no logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Broker", "BrokerConfig"]
