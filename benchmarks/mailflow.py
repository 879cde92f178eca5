"""
Mail-flow figures between two real peers on 127.0.0.1 (real gpg, real
OpenDHT nodes, SMTP and IMAP through the stdlib clients):

  - notification latency: SMTP 250 at alice -> the message is listed in
    bob's INBOX (median of --rounds messages);
  - time to open a 1 MB message: IMAP FETCH BODY[] of a message not pulled
    yet, which pulls, checks and decrypts it (median of --opens);
  - gpg processes started per message on each side.

    python benchmarks/mailflow.py [--rounds 20] [--opens 5]
"""

from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import smtplib
import statistics
import subprocess
import tempfile
import threading
import time
from email.message import EmailMessage

import gnupg

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

from _peers import startPeer


_spawned = {"count": 0}
_realPopen = subprocess.Popen


class CountingPopen(_realPopen):
    """subprocess.Popen, counting gpg processes."""

    def __init__(self, args, *a, **kw):
        if args and os.path.basename(str(args[0])).startswith("gpg"):
            _spawned["count"] += 1
        super().__init__(args, *a, **kw)


def message(subject: str, size: int) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@demo", "bob@demo", subject
    m.set_content("benchmark\n")
    if size:
        m.add_attachment(os.urandom(size), maintype="application", subtype="octet-stream", filename="a.bin")
    return m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def port(peer, name):
    return peer.getServiceNamed(name).port.getHost().port


async def run(reactor, rounds: int, opens: int) -> None:
    root = tempfile.mkdtemp(prefix="p2b", dir="/tmp")
    subprocess.Popen = gnupg.Popen = CountingPopen
    alice = bob = None
    try:
        alice = await startPeer(reactor, root, "alice", "demo", (), pollInterval=60.0)
        bob = await startPeer(reactor, root, "bob", "demo", (("127.0.0.1", alice.dht.port),), pollInterval=60.0)
        smtpPort, imapPort = port(alice, "smtp"), port(bob, "imap")
        def connect():
            smtp = smtplib.SMTP("127.0.0.1", smtpPort)
            smtp.login("alice@demo", "pw")
            imap = imaplib.IMAP4("127.0.0.1", imapPort)
            imap.login("bob@demo", "pw")
            return smtp, imap

        # The clients block: they live in threads, the reactor keeps serving.
        smtp, imap = await deferToThread(connect)

        listed = {}
        arrived = threading.Event()

        def onInbox(event, uid):
            if event == "added":
                listed[uid] = time.perf_counter()
                arrived.set()

        bob.mailStore.addListener("INBOX", onInbox)

        async def sendAndWait(data: bytes):
            arrived.clear()
            sent = await deferToThread(lambda: (smtp.sendmail("alice@demo", ["bob@demo"], data), time.perf_counter())[1])
            while not arrived.is_set():
                await task.deferLater(reactor, 0.001, lambda: None)
            return sent

        # Warm up: first contact pins keys and fills descriptor caches.
        await sendAndWait(message("warm-up", 0))
        latencies = []
        gpgBefore = _spawned["count"]
        for i in range(rounds):
            sent = await sendAndWait(message(f"latency {i}", 10_000))
            latencies.append(listed[max(listed)] - sent)
        await task.deferLater(reactor, 0.5, lambda: None)
        gpgUntilListed = (_spawned["count"] - gpgBefore) / rounds

        opensTimes = []
        for i in range(opens):
            await sendAndWait(message(f"big {i}", 1_000_000))
            uid = max(listed)
            before = _spawned["count"]

            def fetch():
                imap.select("INBOX")
                started = time.perf_counter()
                typ, data = imap.uid("FETCH", str(uid), "(BODY[])")
                assert typ == "OK", (typ, data)
                return time.perf_counter() - started, len(data[0][1])

            seconds, size = await deferToThread(fetch)
            opensTimes.append(seconds)
            gpgOpen = _spawned["count"] - before
        await task.deferLater(reactor, 0.5, lambda: None)
        await deferToThread(smtp.quit)
        await deferToThread(imap.logout)
        ms = sorted(x * 1000 for x in latencies)
        print(f"notification latency (250 at alice -> listed in bob's INBOX), {rounds} messages of 10 KB: "
              f"median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms")
        print(f"open a 1 MB message (IMAP FETCH BODY[], pull + check + decrypt), {opens} times: "
              f"median {statistics.median(opensTimes) * 1000:.0f} ms ({size} bytes served)")
        print(f"gpg processes per message: {gpgUntilListed:.1f} from submission to listed (both sides), "
              f"{gpgOpen} to open it")
    finally:
        subprocess.Popen = gnupg.Popen = _realPopen
        for peer in (bob, alice):
            if peer is not None:
                await peer.stopService()
        shutil.rmtree(root, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--opens", type=int, default=5)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args.rounds, args.opens)))
