"""Per-transaction logs stay bounded: the last few attempts, each under a size cap."""

import glob
import re


def log_of(host):
    """The one transaction log the host has."""
    logs = glob.glob(host.state("logs", "*.log"))
    assert len(logs) == 1, logs
    with open(logs[0], "rb") as f:
        return f.read()


def test_a_transaction_failing_at_every_run_keeps_only_its_last_attempts(isconf, author, server, keys, host,
                                                                          busybox_root):
    # A transaction failing from cron every 15 minutes: its log must not grow with every retry.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "n=0; [ -f /tmp/n ] && n=$(cat /tmp/n); n=$((n+1)); echo $n > /tmp/n; "
                   "echo \"attempt number $n\"; exit 1"])
    host.init(server.url, keys)
    runs = isconf.LOG_ATTEMPTS + 3
    for _ in range(runs):
        host("up", expect="failed")
    log = log_of(host).decode()
    assert len(re.findall(r"(?m)^\[isconf\] \S+ transaction ", log)) == isconf.LOG_ATTEMPTS
    numbers = [int(n) for n in re.findall(r"attempt number (\d+)", log)]
    assert numbers == list(range(runs - isconf.LOG_ATTEMPTS + 1, runs + 1))
    assert log.count("[isconf] exit status 1") == isconf.LOG_ATTEMPTS


def test_a_command_writing_more_than_the_cap_leaves_its_start_and_end_under_the_cap(isconf, author, server, keys,
                                                                                   host, busybox_root):
    busybox_root(host.root)
    total = 2 * isconf.LOG_MAX
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "echo FIRST-LINE; busybox yes 0123456789abcdef | busybox head -c %d; echo LAST-LINE" % total])
    host.init(server.url, keys)
    up = host("up", expect="ok")
    log = log_of(host)
    assert len(log) <= isconf.ATTEMPT_MAX
    assert b"\nFIRST-LINE\n0123456789abcdef\n" in log
    assert log.endswith(b"LAST-LINE\n[isconf] exit status 0\n")
    cut = re.findall(rb"\n\[isconf\] log cut: (\d+) bytes of output left out here", log)
    assert len(cut) == 1
    assert int(cut[0]) >= total - isconf.ATTEMPT_MAX  # what it says it left out is at least what is missing
    assert "LAST-LINE" in up.out  # the terminal still sees the command's output


def test_the_cap_holds_while_the_command_still_writes(isconf, author, server, keys, host, busybox_root):
    # The command itself looks at its log after writing past the cap: it waits until the log is
    # back under the cap while it still runs (exec_timeout ends the wait if it never is).
    busybox_root(host.root)
    script = ("busybox yes 0123456789abcdef | busybox head -c %d; "
              "while true; do size=$(busybox stat -c %%s /var/lib/isconf/logs/*.log); "
              "[ \"$size\" -le %d ] && break; sleep 0.1; done; "
              "echo CUT-WHILE-RUNNING" % (2 * isconf.LOG_MAX, isconf.ATTEMPT_MAX))
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", script])
    host.init(server.url, keys, "--exec-timeout", "60")
    host("up", expect="ok")
    log = log_of(host)
    assert b"CUT-WHILE-RUNNING" in log and len(log) <= isconf.ATTEMPT_MAX
