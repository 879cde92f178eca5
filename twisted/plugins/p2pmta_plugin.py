"""
The C{twistd p2pmta} plugin.  Kept tiny: importing it must not import the
reactor or p2pmta's heavier modules.
"""

from twisted.application.service import ServiceMaker

p2pmta = ServiceMaker(
    "p2pmta",
    "p2pmta.tap",
    "A peer-to-peer, pull-based e-mail peer: SMTP and IMAP for your mail client, "
    "a public outbox, and a node of the OpenDHT network.",
    "p2pmta",
)
