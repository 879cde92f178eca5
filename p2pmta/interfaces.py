# -*- test-case-name: tests.test_interfaces -*-
"""
The seams of a peer: every collaborator is reached through one of these.

Every asynchronous method returns a L{Deferred}, never "a value or a
Deferred".  Implementations are declared with C{@implementer} and checked with
C{verifyObject} in the tests.
"""

from zope.interface import Attribute, Interface


class IDHT(Interface):
    """
    The paper's DHT (section 4.1): several values per key, each protected
    against deletion by a password and purged after its time to live.

    Keys are text (C{"ns:bob@demo"}, C{"nr:alice@demo"}, C{"group:g"} or a
    bare address); values are L{bytes}.
    """

    def put(key: str, value: bytes, password: bytes, ttl: float):
        """
        Store C{value} under C{key} for C{ttl} seconds.

        @return: a Deferred that fires once the value is stored, with the
            number of I{other} nodes that took it (0 for a node alone in its
            network: the value then lives only as long as this node), or
            fails with L{p2pmta.errors.DHTError}.
        """

    def get(key: str):
        """
        Every live value under C{key}: not expired, not deleted, each once.

        @return: a Deferred firing with a L{list} of L{bytes}.
        """

    def delete(key: str, value: bytes, password: bytes):
        """
        Delete C{value} from C{key}, proving C{password}.

        @return: a Deferred that fires with L{None}, or fails with
            L{p2pmta.errors.WrongPassword} when C{password} is not the one
            given at put, or L{p2pmta.errors.NotFound} when no live entry
            holds C{value}.
        """

    def retract(key: str, value: bytes, password: bytes, ttl: float):
        """
        Delete C{value} from C{key} without reading the key first: for a
        caller that put C{value} with C{password}, or was told both, and
        knows the value lives at most C{ttl} more seconds.  Reading a key
        costs the network as much as all its values; this costs one
        tombstone.

        @return: a Deferred that fires with L{None} once the tombstone is
            put.
        """

    def liveEntries(key: str):
        """
        The encoded entries behind L{get}: what a group member keeps to
        L{republish} for a peer that is away.

        @return: a Deferred firing with a list of L{bytes}.
        """

    def republish(key: str, entry: bytes):
        """
        Store again, unchanged, an encoded entry read with L{liveEntries}
        (or listed by its owner): same value, password hash and expiry.
        C{key} may also be C{"hash:"} and the hex SHA-1 of the text key.

        @return: a Deferred firing like L{put}'s, or failing with
            L{p2pmta.errors.DHTError} if C{entry} is not a live entry.
        """

    def deleted(key: str, entry: bytes):
        """
        @return: a Deferred firing with whether a live tombstone deletes the
            encoded C{entry} under C{key}: whoever held its password is done
            with it (a re-publisher stops then).
        """

    def listen(key: str, callback):
        """
        Call C{callback(value)} in the reactor thread for each live value
        that appears under C{key} from now on (values already there may be
        reported too; callers de-duplicate).

        @return: a Deferred that fires with L{None} once the listener is set.
        """


class IKeyring(Interface):
    """
    The peer's OpenPGP identity and its key cache of other peers' public keys,
    pinned on first use.  All calls run gpg off the reactor thread.
    """

    fingerprint = Attribute("The peer's own key fingerprint, upper-case hex (str).")
    address = Attribute("The peer's own address (str), the user id of its key.")

    def publicKey():
        """
        @return: a Deferred firing with the peer's own ASCII-armoured public
            key (L{bytes}).
        """

    def pin(address: str, armoredKey: bytes, fingerprint: str):
        """
        Import C{armoredKey} for C{address} into the key cache, if it is the
        key whose fingerprint is C{fingerprint} and its user id names
        C{address}.  The first key seen for an address is pinned; a later,
        different one is refused.

        @return: a Deferred firing with the fingerprint, or failing with
            L{p2pmta.errors.KeyMismatch} (pinned to another key, or the key
            is not the one announced) or L{p2pmta.errors.BadKey}.
        """

    def pinned(address: str):
        """
        @return: a Deferred firing with the pinned fingerprint of C{address},
            or L{None}.
        """

    def sign(data: bytes):
        """
        @return: a Deferred firing with a detached, ASCII-armoured signature
            of C{data} by the peer's key.
        """

    def verify(data: bytes, signature: bytes, address: str):
        """
        Check a detached signature by C{address}'s pinned key.

        @return: a Deferred firing with the signer's fingerprint, or failing
            with L{p2pmta.errors.BadSignature}.
        """

    def encrypt(data: bytes, recipients, sign: bool = False):
        """
        Encrypt C{data} once for all C{recipients} (addresses with pinned
        keys).  With C{sign}, sign it with the peer's key too.

        @return: a Deferred firing with the binary OpenPGP message.
        """

    def decrypt(data: bytes, maxOutput: int, sender=None):
        """
        Decrypt C{data} with the peer's key.  With C{sender}, require a valid
        signature by that address's pinned key.  Output larger than
        C{maxOutput} bytes, a message without integrity protection, or any
        gpg error is a failure, never partial plaintext.

        @return: a Deferred firing with the plaintext L{bytes}, or failing
            with L{p2pmta.errors.DecryptionFailed} or
            L{p2pmta.errors.BadSignature}.
        """


class IOutbox(Interface):
    """
    The public outbox: ciphertexts named by the lowercase hex SHA-256 of
    their bytes.
    """

    def add(data: bytes):
        """
        Store C{data} atomically.

        @return: a Deferred firing with its hex digest.
        """

    def path(digest: str):
        """
        @return: the L{twisted.python.filepath.FilePath} of a stored
            ciphertext, or L{None} if C{digest} is malformed or not held.
        """

    def digests():
        """
        @return: a sorted L{list} of the digests held.
        """

    def remove(digest: str):
        """
        Remove a stored ciphertext; removing an absent one is not an error.

        @return: a Deferred firing with L{None}.
        """

    def removeMany(digests):
        """
        Remove several stored ciphertexts at once, as L{remove} does.

        @return: a Deferred firing with L{None}.
        """


class IMailStore(Interface):
    """
    The peer's mailboxes (C{INBOX}, C{Sent}, C{Outbox}): message metadata in
    SQLite, message files in a Maildir.  What the IMAP server shows.

    A message may be held without its body: a received notification shows
    its real header section and size in C{INBOX} before the body is pulled
    from the sender.  Reading metadata is synchronous (from an index kept in
    memory, so SELECT and FETCH of flags or headers never wait); anything
    that writes, or needs a body, returns a Deferred.
    """

    def mailboxNames():
        """
        @return: a list of C{(name, attributes)}: e.g. C{("Sent", ["\\\\Sent"])}.
        """

    def uidValidity(mailbox: str):
        """@return: the mailbox's UIDVALIDITY (int), stable across restarts."""

    def uidNext(mailbox: str):
        """@return: the UID the next message of C{mailbox} will get."""

    def messages(mailbox: str):
        """
        @return: the messages of C{mailbox}, as a list of
            L{p2pmta.mailindex.MessageRecord}, in UID order.
        """

    def record(mailbox: str, uid: int):
        """@return: one L{p2pmta.mailindex.MessageRecord}, or L{None}."""

    def body(mailbox: str, uid: int):
        """
        The whole message (header section and body), pulling it first if it
        is not held yet.

        @return: a Deferred firing with the path of a file holding the
            message's exact bytes, which never change for this UID (or with
            those bytes themselves: for a message just pulled that is still
            being written, or one the store keeps in its database), or
            failing with
            L{p2pmta.errors.BodyUnavailable}.
        """

    def written(mailbox: str, uids):
        """
        Wait until the bodies of C{uids} that L{body} gave as bytes are
        written (or failed to be, in which case they are pulled again).

        @return: a Deferred firing with L{None}.
        """

    def setFlags(mailbox: str, uids, flags, mode: str):
        """
        Change flags: C{mode} is C{"set"}, C{"add"} or C{"remove"}.

        @return: a Deferred firing with a dict C{{uid: new flags}}.
        """

    def append(mailbox: str, message: bytes, flags=(), date=None):
        """
        Store a complete message.

        @return: a Deferred firing with its UID.
        """

    def expunge(mailbox: str, uids):
        """
        Remove messages for good.

        @return: a Deferred firing with the list of UIDs removed.
        """

    def addListener(mailbox: str, listener):
        """
        Call C{listener(event, uid)} in the reactor thread after every
        change of C{mailbox}: C{event} is C{"added"}, C{"expunged"} or
        C{"flags"}.
        """

    def removeListener(mailbox: str, listener):
        """Stop calling C{listener}."""


class ISubmission(Interface):
    """
    What the SMTP submission server hands accepted mail to: the sending
    pipeline (paper, section 4.3 steps 1-5).
    """

    maxMessageSize = Attribute("The largest message accepted, in bytes (int).")
    spoolDirectory = Attribute(
        "A folder (str) on the spool's file system where the SMTP server "
        "writes a message while it arrives; L{accept} takes the file over."
    )
    keepsEnvelopes = Attribute(
        "Whether the SMTP server should keep each message's envelope with "
        "its spool file (L{p2pmta.spool.Envelope}, written by "
        "L{p2pmta.spool.flushAndClose}) (bool)."
    )

    def checkRecipient(address):
        """
        Check at RCPT time that mail can be sent to C{address} (an
        L{p2pmta.address.Address}): it has a live peer descriptor and a key.

        @return: a Deferred firing with L{None}, or failing with
            L{p2pmta.errors.UnknownPeer} or L{p2pmta.errors.CryptoError}.
        """

    def sessions(count: int):
        """
        The SMTP server has C{count} sessions open now (told at each
        change): with none, no message is on its way.
        """

    def accept(sender, recipients, path: str, flushing, check):
        """
        Take over a complete message file at C{path} in L{spoolDirectory}
        (CRLF line ends), from C{sender} for C{recipients} (lists of
        L{p2pmta.address.Address}), while the caller puts it on disk.
        Should this fail, the file is the caller's again.

        @param flushing: a Deferred firing once the file and its name are on
            disk (fsynced), or failing; with L{True} if the file's envelope
            is on disk with it (see L{keepsEnvelopes}).
        @param check: the file's C{(size, CRC-32)}, to tell it whole after a
            crash.
        @return: a Deferred firing once the message is durably in the spool
            and C{flushing} has fired (the SMTP server then answers 250),
            with a message id (str); if either fails, failing once both
            are done.
        """
