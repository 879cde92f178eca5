"""
The conventional push system the paper compares with: the receiver's SMTP
server takes every message in and delivers it into a Maildir, an IMAP
server serves that Maildir to the local client.

  - L{PostfixDovecot}: Postfix (a separate C{postmulti} instance, local
    delivery into the user's Maildir) and Dovecot (its own config file);
    Debian's packages, installed when root and missing;
  - L{TwistedMail}: the fallback where those cannot be had, clearly
    labelled: Twisted's stock ESMTP server delivering into a Maildir, behind
    Twisted's stock IMAP4 server (L{paperbench.twistedmail}), in a
    subprocess.

Everything a setup creates (instance, user, config, processes) is per
benchmark process (named after its pid) and removed by C{stop}, so two
benchmarks can run side by side and a killed one can be cleaned up later
(L{removeStale}).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from paperbench.procs import Child, freePorts, run
from paperbench.procstat import ProcessSet

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAIN = "p2b.bench"
PASSWORD = "bench-pw"
PACKAGES = ("postfix", "dovecot-core", "dovecot-imapd")

#: Postfix settings the benchmark changes from the defaults, and why.
POSTFIX_SETTINGS = {
    # Loopback only, nothing leaves the machine.
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "myhostname": DOMAIN,
    "mydestination": DOMAIN,
    "relayhost": "",
    "default_transport": "error",
    "relay_transport": "error",
    # Local delivery into the user's Maildir, as Dovecot reads it.
    "home_mailbox": "Maildir/",
    "message_size_limit": str(64 * 1024 * 1024),
    "mailbox_size_limit": "0",
    "biff": "no",
    # Throttles off: the sweep refuses nothing, but a benchmark should never
    # measure Postfix's deliberate sleeps (error sleep, flow control).
    "smtpd_error_sleep_time": "0",
    "smtpd_soft_error_limit": "1000",
    "smtpd_hard_error_limit": "1000",
    "in_flow_delay": "0",
    "smtpd_client_connection_rate_limit": "0",
    "smtpd_client_message_rate_limit": "0",
}


def _installed() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "postmulti", "postconf", "dovecot", "doveadm"))


def ensurePostfixDovecot(log=print, install: bool = True) -> str | None:
    """
    Make Postfix and Dovecot available, installing Debian's packages when
    root, missing and C{install}.

    @return: L{None} when they are there, else why not.
    """
    if _installed():
        return None
    if not install:
        return "Postfix/Dovecot are not installed (and --no-install)"
    if os.geteuid() != 0:
        return "Postfix/Dovecot are not installed and installing needs root"
    if shutil.which("apt-get") is None:
        return "Postfix/Dovecot are not installed and there is no apt-get"
    log("installing postfix, dovecot-core, dovecot-imapd from Debian's packages ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    selections = f"postfix postfix/main_mailer_type select Local only\npostfix postfix/mailname string {DOMAIN}\n"
    run(["debconf-set-selections"], check=False, input=selections)
    # Keep the packages' own daemons (Postfix on :25, Dovecot on :143) from
    # starting: the benchmark runs instances of its own.
    policy = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(policy)
    if ours:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        result = run(["apt-get", "install", "-y", "-q", *PACKAGES], check=False, env=env)
        if result.returncode != 0:
            run(["apt-get", "update", "-q"], check=False, env=env)
            result = run(["apt-get", "install", "-y", "-q", *PACKAGES], check=False, env=env)
    finally:
        if ours:
            os.unlink(policy)
    if result.returncode != 0 or not _installed():
        return f"installing Postfix/Dovecot failed: {result.stderr.strip()[-300:]}"
    return None


def versions() -> dict[str, str]:
    facts = {}
    if shutil.which("postconf"):
        facts["postfix"] = run(["postconf", "-d", "-h", "mail_version"], check=False).stdout.strip()
    if shutil.which("dovecot"):
        facts["dovecot"] = run(["dovecot", "--version"], check=False).stdout.strip()
    return facts


class PostfixDovecot:
    """
    A Postfix instance and a Dovecot of the benchmark's own, on loopback
    ports below the ephemeral range, for a local user made for the run.
    """

    name = "postfix"

    def __init__(self, root: str) -> None:
        self.root = root
        tag = f"p2b{os.getpid()}"
        self.label = "Postfix (own postmulti instance, local delivery to Maildir) + Dovecot IMAP"
        self.instance = f"postfix-{tag}"
        self.configDir = f"/etc/{self.instance}"
        self.user = tag
        self.smtpPort, self.imapPort = freePorts(2)
        self.doveConf = os.path.join(root, "dovecot", "dovecot.conf")
        self._created: list[str] = []

    # What the workload needs to know

    @property
    def smtp(self):
        return ("127.0.0.1", self.smtpPort, None)  # a receiving MTA: no AUTH, loopback is in mynetworks

    @property
    def imap(self):
        return ("127.0.0.1", self.imapPort, (self.user, PASSWORD))

    mailFrom = f"alice@{DOMAIN}"
    rcptTo = property(lambda self: f"{self.user}@{DOMAIN}")

    def counted(self):
        """The receiver's traffic: everything through its SMTP server's port."""
        return {"smtp": [("tcp", self.smtpPort)]}

    def local(self):
        return {"imap": [("tcp", self.imapPort)]}

    def roles(self):
        """Postfix's processes (its master and workers) and Dovecot's, summed."""
        return {"receiver": ProcessSet([self._postfixPid(), self._dovecotPid()])}

    def _postfixPid(self) -> int:
        queue = run(["postconf", "-c", self.configDir, "-h", "queue_directory"]).stdout.strip()
        return _readPid(os.path.join(queue, "pid", "master.pid"))

    def _dovecotPid(self) -> int:
        return _readPid(os.path.join(self.root, "dovecot", "run", "master.pid"))

    # Life cycle

    def start(self) -> None:
        self._startUser()
        self._startPostfix()
        self._startDovecot()

    def _startUser(self) -> None:
        run(["useradd", "-m", "-s", "/usr/sbin/nologin", self.user])
        self._created.append("user")
        self.home = os.path.expanduser(f"~{self.user}")
        self.uid = int(run(["id", "-u", self.user]).stdout)
        self.gid = int(run(["id", "-g", self.user]).stdout)

    def _startPostfix(self) -> None:
        run(["postmulti", "-e", "init"])
        run(["postmulti", "-I", self.instance, "-e", "create"])
        self._created.append("postfix")
        conf = self.configDir
        settings = dict(POSTFIX_SETTINGS)
        settings["alias_maps"] = settings["alias_database"] = f"hash:{conf}/aliases"
        settings["maillog_file"] = os.path.join(self.root, "postfix.log")
        settings["maillog_file_prefixes"] = f"/var,{self.root}"  # else Postfix refuses our log path
        settings["multi_instance_enable"] = "yes"
        run(["postconf", "-c", conf, "-e", *(f"{k}={v}" for k, v in settings.items())])
        # postmulti creates instances with their inet services disabled.
        run(["postconf", "-c", conf, "-X", "master_service_disable"])
        with open(os.path.join(conf, "aliases"), "w") as f:
            f.write("postmaster: root\n")
        run(["postalias", f"hash:{conf}/aliases"])
        # No chroot (the instance's chroot would lack what it needs), and
        # the SMTP service on our loopback port instead of :25.
        run(["postconf", "-c", conf, "-F", "*/*/chroot=n"])
        run(["postconf", "-c", conf, "-MX", "smtp/inet"])
        run(["postconf", "-c", conf, "-M",
             f"127.0.0.1:{self.smtpPort}/inet=127.0.0.1:{self.smtpPort} inet n - n - - smtpd"])
        # Postfix logs through postlogd when maillog_file is set.
        if "postlog" not in run(["postconf", "-c", conf, "-M"]).stdout:
            run(["postconf", "-c", conf, "-M", "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd"])
        run(["postfix", "-c", conf, "check"], check=False)
        run(["postfix", "-c", conf, "start"])
        self._created.append("postfix-running")
        _waitPort(self.smtpPort, "Postfix")

    def _startDovecot(self) -> None:
        base = os.path.join(self.root, "dovecot")
        os.makedirs(base, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(base, 0o755)
        users = os.path.join(base, "users")
        with open(users, "w") as f:
            f.write(f"{self.user}:{{PLAIN}}{PASSWORD}:{self.uid}:{self.gid}::{self.home}::\n")
        os.chmod(users, 0o644)
        with open(self.doveConf, "w") as f:
            f.write(f"""\
# The benchmark's own Dovecot: IMAP on loopback only, no TLS, one user.
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
instance_name = dovecot-{self.user}
log_path = {base}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imapPort}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
        # Dovecot daemonizes and keeps its stdout: give it a file, not a pipe.
        with open(os.path.join(base, "dovecot.out"), "wb") as out:
            subprocess.run(["dovecot", "-c", self.doveConf], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, check=True)
        self._created.append("dovecot")
        _waitPort(self.imapPort, "Dovecot")

    def stop(self) -> None:
        if "dovecot" in self._created:
            pid = _readPid(os.path.join(self.root, "dovecot", "run", "master.pid"), None)
            run(["doveadm", "-c", self.doveConf, "stop"], check=False)
            _waitGone(pid)
        if "postfix-running" in self._created:
            try:
                pid = self._postfixPid()
            except (OSError, ValueError, RuntimeError):
                pid = None
            run(["postfix", "-c", self.configDir, "stop"], check=False)
            _waitGone(pid)
        if "postfix" in self._created:
            destroyInstance(self.instance)
        if "user" in self._created:
            # Whatever still runs as the user made for this run is ours
            # (an imap or local process on its way out).
            for pid in _processesOf(self.uid):
                _signal(pid, 9)
            run(["userdel", "-r", self.user], check=False)
        self._created = []

    def logs(self) -> list[str]:
        return [os.path.join(self.root, "postfix.log"), os.path.join(self.root, "dovecot", "dovecot.log")]


def destroyInstance(instance: str) -> None:
    """Stop, disable and destroy a postmulti instance, whatever state it is in."""
    run(["postmulti", "-i", instance, "-p", "stop"], check=False)
    run(["postmulti", "-i", instance, "-e", "disable"], check=False)
    # destroy refuses while mail is queued: flush the queue first.
    run(["postsuper", "-c", f"/etc/{instance}", "-d", "ALL"], check=False)
    if run(["postmulti", "-i", instance, "-e", "destroy"], check=False).returncode != 0:
        # Forget the instance ourselves.
        listed = run(["postconf", "-h", "multi_instance_directories"], check=False).stdout.split()
        kept = [d for d in listed if d != f"/etc/{instance}"]
        run(["postconf", "-e", f"multi_instance_directories={' '.join(kept)}"], check=False)
    # destroy leaves pid files and sockets behind, and so their directories.
    for path in (f"/etc/{instance}", f"/var/spool/{instance}", f"/var/lib/{instance}"):
        shutil.rmtree(path, True)


def removeStale(log=print) -> None:
    """
    Remove what benchmarks that were killed (SIGKILL: no clean-up ran) left:
    their Dovecot, Postfix instance and user, all named after their pid.
    """
    if os.geteuid() != 0:
        return
    for name in os.listdir("/tmp"):
        match = re.fullmatch(r"p2bench(\d+)-\w+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            conf = os.path.join("/tmp", name, "baseline", "dovecot", "dovecot.conf")
            if os.path.exists(conf) and shutil.which("doveadm"):
                log(f"stopping the Dovecot of a killed benchmark ({conf})")
                run(["doveadm", "-c", conf, "stop"], check=False)
    if shutil.which("postconf"):
        listed = run(["postconf", "-h", "multi_instance_directories"], check=False).stdout.split()
        for directory in listed:
            match = re.fullmatch(r"/etc/postfix-p2b(\d+)", directory)
            if match and not os.path.exists(f"/proc/{match.group(1)}"):
                log(f"removing the Postfix instance of a killed benchmark ({directory})")
                destroyInstance(os.path.basename(directory))
    with open("/etc/passwd") as f:
        users = re.findall(r"^p2b(\d+):", f.read(), re.MULTILINE)
    for pid in users:
        if not os.path.exists(f"/proc/{pid}"):
            log(f"removing the user of a killed benchmark (p2b{pid})")
            run(["userdel", "-r", f"p2b{pid}"], check=False)


_NO_DEFAULT = object()


def _readPid(path: str, default=_NO_DEFAULT) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        if default is _NO_DEFAULT:
            raise
        return default


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _waitGone(pid: int | None, timeout: float = 10.0) -> None:
    """Wait for C{pid} to end; SIGKILL it after C{timeout}."""
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            _signal(pid, 9)
            return
        time.sleep(0.05)


def _processesOf(uid: int) -> list[int]:
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except OSError:
            pass
    return pids


def _waitPort(port: int, what: str, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


class TwistedMail:
    """
    The fallback baseline: Twisted's stock ESMTP and IMAP4 servers over a
    Maildir, in one subprocess (L{paperbench.twistedmail}).
    """

    name = "twisted"

    def __init__(self, root: str) -> None:
        self.root = root
        self.label = ("FALLBACK baseline: Twisted's stock ESMTP server delivering into a Maildir + "
                      "Twisted's stock IMAP4 server (twisted.mail), one process")
        self.smtpPort, self.imapPort = freePorts(2)
        self.child: Child | None = None

    @property
    def smtp(self):
        return ("127.0.0.1", self.smtpPort, None)

    @property
    def imap(self):
        return ("127.0.0.1", self.imapPort, ("bob", PASSWORD))

    mailFrom = f"alice@{DOMAIN}"
    rcptTo = f"bob@{DOMAIN}"

    def counted(self):
        return {"smtp": [("tcp", self.smtpPort)]}

    def local(self):
        return {"imap": [("tcp", self.imapPort)]}

    def roles(self):
        return {"receiver": ProcessSet([self.child.pid])}

    def start(self) -> None:
        maildir = os.path.join(self.root, "Maildir")
        self.child = Child(
            "Twisted mail server",
            [sys.executable, os.path.join(HERE, "twistedmail.py"), "--smtp", str(self.smtpPort),
             "--imap", str(self.imapPort), "--maildir", maildir, "--user", "bob", "--password", PASSWORD],
            os.path.join(self.root, "twistedmail.log"),
        )
        self.child.waitFor(r"ready")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def logs(self) -> list[str]:
        return [self.child.log] if self.child else []
