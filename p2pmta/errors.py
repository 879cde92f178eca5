# -*- test-case-name: tests.test_errors -*-
"""
One exception tree for p2pmta.  Each docstring is the sentence a user sees.
"""


class P2PMTAError(Exception):
    """Something went wrong in p2pmta."""

    def __str__(self) -> str:
        detail = super().__str__()
        summary = (self.__doc__ or "").strip()
        return f"{summary} ({detail})" if detail else summary


class ConfigError(P2PMTAError):
    """The peer's configuration is not valid."""


class BadAddress(P2PMTAError, ValueError):
    """That is not a p2pmta address of the form name@group."""


class DHTError(P2PMTAError):
    """The DHT did not accept the operation."""


class ValueTooLarge(DHTError):
    """The value is too large to be stored in the DHT."""


class WrongPassword(DHTError):
    """The password does not match the one given when the entry was stored."""


class NotFound(DHTError):
    """No live entry holds that value."""


class CryptoError(P2PMTAError):
    """An OpenPGP operation failed."""


class GPGUnavailable(CryptoError):
    """GnuPG (the gpg program) could not be run."""


class BadKey(CryptoError):
    """That is not a usable OpenPGP public key."""


class KeyMismatch(CryptoError):
    """The key differs from the one pinned or announced for that address."""


class UnknownKey(CryptoError):
    """No key is known for that address."""


class BadSignature(CryptoError):
    """The signature is missing or does not verify against the sender's key."""


class DecryptionFailed(CryptoError):
    """The message could not be decrypted and authenticated."""


class SealingFailed(CryptoError):
    """A sealing process could not encrypt the messages; the peer does it itself."""


class StoreError(P2PMTAError):
    """The peer's data directory could not be used."""


class NoSuchMailbox(StoreError):
    """There is no mailbox of that name."""


class DiskFull(StoreError):
    """The disk holding the mail store is full."""


class NoSuchMessage(StoreError):
    """There is no message with that UID in the mailbox."""


class HeaderMismatch(StoreError):
    """The message does not start with the header section it was announced with."""


class BadDescriptor(P2PMTAError):
    """The peer descriptor is malformed, expired or not signed by its peer."""


class UnknownPeer(P2PMTAError):
    """No live, verifiable peer descriptor was found for that address."""


class FetchError(P2PMTAError):
    """The other peer's outbox could not be reached or answered badly."""


class BodyUnavailable(P2PMTAError):
    """The message body cannot be had right now; try again later."""


class StartError(P2PMTAError):
    """A service of the peer cannot start."""
