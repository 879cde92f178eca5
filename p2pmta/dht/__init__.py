# -*- test-case-name: tests.test_dht -*-
"""
The DHT of the paper (section 4.1) built on OpenDHT.

L{p2pmta.interfaces.IDHT} has two providers with one contract:
L{p2pmta.dht.node.OpenDHTNode}, the product's engine, an embedded OpenDHT
node; and L{p2pmta.dht.memory.MemoryDHT}, an in-memory network with a clock
the tests control.
"""

#: The OpenDHT network id of p2pmta peers ("p2mt"): isolates them from the
#: public Jami network (id 0), where p2pmta's value types are unknown.
NETWORK_ID = 0x70326D74

#: How long a peer descriptor lives (paper, section 4.2).
DESCRIPTOR_TTL = 24 * 60 * 60.0

#: How long a notification lives (paper, section 4.3 step 5).
NOTIFICATION_TTL = 7 * 24 * 60 * 60.0

__all__ = ["NETWORK_ID", "DESCRIPTOR_TTL", "NOTIFICATION_TTL"]
