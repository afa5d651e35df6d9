"""Every error zswarm raises to its users, in one tree.

    ZswarmError                 base: catch this to catch everything zswarm raises
    +-- ConfigError             a config file or value is wrong: fix the config (CLI exit status 2)
    +-- InvalidName             a file name that can never be shared ('..', absolute, control bytes)
    +-- ProtocolError           the other side broke the protocol
    |   +-- MalformedMessage    a frame failed decoding or validation: the sender is buggy or hostile
    +-- RemoteError             the other side answered with an error code (.code, .message)
    |   +-- NotFound            the broker has no file of that name: check the name (`list`)
    +-- IntegrityError          bytes did not match their checksum: they were discarded
    +-- TransferError           a download could not finish: retrying later may succeed
    |   +-- BrokerUnavailable   the broker did not answer in time: is it running, is the endpoint right?
    |   +-- NoSourceLeft        some segments have no live source (not even the broker)
    +-- StorageError            the local disk refused a read or write: fix the disk, then retry
    |   +-- DiskFull            no space left: free space, then retry (verified segments are kept)
    +-- ClosedError             the broker or peer object was closed

Errors that cross the wire carry a code (`WireCode`); `RemoteError.from_wire` maps a code back to
the most specific class so that a caller never has to compare strings.
"""

from __future__ import annotations

import enum


class WireCode(enum.StrEnum):
    MALFORMED = "malformed"  # the request could not be decoded or failed validation
    UNKNOWN_OP = "unknown_op"  # decodable, but not a request this endpoint answers
    NOT_FOUND = "not_found"  # no such file
    NOT_REGISTERED = "not_registered"  # the sender must `register` first (e.g. the broker restarted)
    BAD_REQUEST = "bad_request"  # well-formed but impossible (segment out of range, ...)
    NOT_HELD = "not_held"  # the server holds none of the requested segments
    VERSION = "version"  # protocol version not supported
    INTERNAL = "internal"  # the server failed; the request may be retried
    BUSY = "busy"  # a transient condition (a manifest being rebuilt, no file descriptor free): retry
    NAME_TAKEN = "name_taken"  # another live peer registered this name from another connection
    FORBIDDEN = "forbidden"  # authenticated mode: the sender's key may not do this (another's name)


class ZswarmError(Exception):
    """Base class of every error zswarm raises."""


class ConfigError(ZswarmError):
    """A config file or value is wrong. The message names the file, the key and the problem."""


class InvalidName(ZswarmError, ValueError):
    """A file name that no broker can share: nothing was sent or created."""


class ProtocolError(ZswarmError):
    """The other side broke the protocol."""


class MalformedMessage(ProtocolError):
    """A message failed decoding or validation."""


class RemoteError(ZswarmError):
    """The other side answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message

    @staticmethod
    def from_wire(code: str, message: str) -> RemoteError:
        if code == WireCode.NOT_FOUND:
            return NotFound(code, message)
        return RemoteError(code, message)


class NotFound(RemoteError):
    """The broker has no file of that name."""


class IntegrityError(ZswarmError):
    """Bytes did not match their checksum."""


class TransferError(ZswarmError):
    """A download could not finish."""


class BrokerUnavailable(TransferError):
    """The broker did not answer in time."""


class NoSourceLeft(TransferError):
    """Some segments have no live source left."""


class StorageError(ZswarmError):
    """The local disk refused a read or a write."""


class DiskFull(StorageError):
    """No space left on the device that holds the data folder."""


class ClosedError(ZswarmError):
    """The object was closed."""
