"""
The machinery of C{benchmarks/paper.py}: the experiments of the paper's
section 5 (Figures 3-5), run against p2pmta and a conventional push system.

  - L{paperbench.procs}: free ports, child processes and their clean-up;
  - L{paperbench.dhtnodes}: a helper process of plain OpenDHT nodes;
  - L{paperbench.peers}: two p2pmta peers as C{twistd} processes;
  - L{paperbench.baseline}: Postfix + Dovecot, or the Twisted fallback
    (whose server is L{paperbench.twistedmail});
  - L{paperbench.traffic}: kernel byte counters per port;
  - L{paperbench.procstat}: peak RSS and CPU seconds from /proc;
  - L{paperbench.workload}: the messages, the SMTP sender, the IMAP reader;
  - L{paperbench.experiment}: one system driven through timed runs, the
    acceptance sweep and the notification-latency probe;
  - L{paperbench.report}: CSV, table, summary.json, results.md, plots.

Everything here is plain blocking Python with a few threads: the systems
under test run in processes of their own, so the harness needs no reactor.
"""
