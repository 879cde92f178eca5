"""
p2pmta: a peer-to-peer, pull-based e-mail system.

A peer keeps the mail its user sends in its own public outbox and tells each
receiver through a DHT; receivers pull a message only when it is opened.
"""

__version__ = "0.1.0"
