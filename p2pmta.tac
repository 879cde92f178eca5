# The p2pmta demo: two peers, alice@demo and bob@demo, on this machine.
#
#     twistd -ny p2pmta.tac
#
# Data lives under ./demo-data (one folder per peer); see README.rst.
import os

from twisted.application.service import Application
from twisted.internet import reactor

from p2pmta.demo import demoService

application = Application("p2pmta-demo")
demoService(reactor, os.path.abspath("demo-data")).setServiceParent(application)
