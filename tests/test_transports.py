"""
Tests for L{p2pmta.transports}: the send limit of the TCP transport under
a protocol's wrappers.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from p2pmta.transports import SEND_LIMIT, sendInLargeWrites


class SendInLargeWritesTests(SynchronousTestCase):
    def test_raised(self) -> None:
        """A transport of Twisted's own gets the limit; others do not change."""
        transport = FileDescriptor(reactor)
        self.assertEqual(transport.SEND_LIMIT, FileDescriptor.SEND_LIMIT)
        self.assertTrue(sendInLargeWrites(transport))
        self.assertEqual(transport.SEND_LIMIT, SEND_LIMIT)
        self.assertEqual(FileDescriptor.SEND_LIMIT, 128 * 1024, "only this transport")

    def test_throughWrappers(self) -> None:
        """The transport under wrappers (a policy's, TLS's) gets the limit."""
        transport = FileDescriptor(reactor)
        inner = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        inner.makeConnection(transport)
        outer = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        outer.makeConnection(inner)
        self.assertTrue(sendInLargeWrites(outer))
        self.assertEqual(transport.SEND_LIMIT, SEND_LIMIT)

    def test_higherKept(self) -> None:
        """A limit already higher is kept."""
        transport = FileDescriptor(reactor)
        transport.SEND_LIMIT = 4 * SEND_LIMIT
        sendInLargeWrites(transport)
        self.assertEqual(transport.SEND_LIMIT, 4 * SEND_LIMIT)

    def test_otherTransports(self) -> None:
        """A transport that is not Twisted's own (a test's) is left alone."""
        self.assertFalse(sendInLargeWrites(StringTransport()))
        self.assertFalse(sendInLargeWrites(None))


class _Raising(Protocol):
    def connectionMade(self) -> None:
        sendInLargeWrites(self.transport)
        self.factory.made.callback(self.transport)


class RealConnectionTests(TestCase):
    @inlineCallbacks
    def test_realConnection(self) -> None:
        """
        On a real TCP connection through a policy wrapper, the server side
        sends up to the limit at a time, and a large write still arrives
        whole and in order.
        """
        factory = Factory.forProtocol(_Raising)
        factory.made = Deferred()
        port = reactor.listenTCP(0, WrappingFactory(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        received = bytearray()
        done = Deferred()

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)
                if len(received) == len(payload):
                    self.transport.loseConnection()

            def connectionLost(self, reason) -> None:
                done.callback(None)

        payload = bytes(range(256)) * (3 * SEND_LIMIT // 256 + 7)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoint.connect(Factory.forProtocol(Reader))
        server = yield factory.made
        self.assertEqual(server.SEND_LIMIT, SEND_LIMIT)
        server.write(payload)
        yield done
        self.assertEqual(bytes(received), payload)
        server.loseConnection()
        client.transport.loseConnection()
