"""Interruptions told apart: an attempt the agent stops on a signal it caught ends with an 'interrupted'
record naming the signal; only attempts that vanished (or that a reboot followed) count toward
interrupted_max, and the halt says whether the machine rebooted during them.  A reboot is modelled by
the history alone: a start recorded under another boot id is what a rebooted machine finds."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, undated, wait_gone


# The command under test: counts its attempts, then sleeps (by exec: the pid it wrote is the sleep's)
# until /tmp/go exists.
LONG = "echo x >> /tmp/attempts; echo $$ > /tmp/pid; test -e /tmp/go || exec sleep 60"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def other_boot(n):
    """The boot id of the n-th boot before this one (each boot has its own)."""
    return "00000000-0000-4000-8000-%012d" % n


def history(host):
    with open(host.state("history")) as f:
        return [json.loads(line) for line in f]


def rewrite_history(host, change):
    """The history as a later run finds it: change(event, n) edits each event in place (n: how many
    starts came before it)."""
    events, n = history(host), 0
    for event in events:
        change(event, n)
        n += event["event"] == "started"
    with open(host.state("history"), "w") as f:
        f.write("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in events))


def attempts(host):
    try:
        with open(host.path("/tmp/attempts")) as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 0


@pytest.fixture
def long_host(author, host, busybox_root):
    """A host whose only transaction runs a command that sleeps until told to go (interrupted_max 3)."""
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", LONG])
    host.init(author.repo, author.keys)
    return host


def stopped_up(host, signum, daemons):
    """One 'up' stopped by signum while its command sleeps; returns its exit status.  The agent stops the
    command itself on a signal it catches; after a SIGKILL the command is left running, and killed here."""
    before = attempts(host)
    agent = subprocess.Popen([host.python or sys.executable, "-I", ISCONF, "--root", host.root, "up"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while attempts(host) == before or not os.path.exists(host.path("/tmp/pid")):
            assert agent.poll() is None and time.time() < deadline, "the command never started"
            time.sleep(0.05)
        time.sleep(0.2)  # the shell wrote its pid: it is the sleep now
        with open(host.path("/tmp/pid")) as f:
            command = int(f.read())
        os.unlink(host.path("/tmp/pid"))
        daemons.append(command)
        agent.send_signal(signum)
        code = agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    if signum == signal.SIGKILL:
        os.kill(command, signal.SIGKILL)
    assert wait_gone(command), "the command outlived the run"
    return code


@pytest.mark.parametrize("signum,python", [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGHUP, None),
                                           (signal.SIGTERM, "3.6")], ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGTERM-3.6"])
def test_a_long_command_stopped_by_a_signal_three_times_is_never_halted(long_host, signum, python, daemons):
    host, name = long_host, signal.Signals(signum).name
    if python:  # the oldest interpreter the agent supports
        found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % python))
        assert found, "no Python %s under /root/.pyenv" % python
        host.python = found[-1]
    for n in (1, 2, 3):
        assert stopped_up(host, signum, daemons) == 128 + signum
        report = host.status()
        assert report["state"] == "interrupted", report
        assert report["interrupted"]["signal"] == name and report["interrupted"]["attempts"] == 0, report
        assert report["interrupted"]["signals"] == [name] * n and report["interrupted"]["rebooted"] == 0, report
        (log,) = glob.glob(host.state("logs", "000001-*.log"))
        with open(log) as f:
            assert f.read().rstrip().endswith("[isconf] interrupted by %s" % name)
    text = host("status").out
    assert ("stopped by %s; stopped by a signal 3 times without a reboot, not counted (%s); interrupted 0 of 3 "
            "times: the next 'up' runs it again" % (name, name)) in text, text
    open(host.path("/tmp/go"), "w").close()
    host("up", expect="ok")  # the fourth runs it to its end
    assert attempts(host) == 4 and host.status()["state"] == "up-to-date"
    events = history(host)
    assert [(e["event"], e.get("signal")) for e in events] == \
        [("started", None), ("interrupted", name)] * 3 + [("started", None), ("done", None)]
    with open(BOOT_ID) as f:
        boot = f.read().strip()
    assert [e["boot_id"] for e in events if e["event"] == "started"] == [boot] * 4


def test_only_attempts_that_vanished_count_and_the_halt_says_there_was_no_reboot(long_host, daemons):
    host = long_host
    for signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        stopped_up(host, signum, daemons)
    report = host.status()
    assert report["interrupted"]["attempts"] == 3 and report["interrupted"]["signal"] is None, report
    assert report["interrupted"]["signals"] == ["SIGTERM", "SIGINT", "SIGTERM"], report
    assert "never ended; stopped by a signal 3 times without a reboot, not counted (SIGINT, SIGTERM); interrupted " \
        "3 of 3 times: the next 'up' halts it" in host("status").out
    for _ in range(2):  # halted, and it stays halted
        proc = host("up", expect="failed")
        assert attempts(host) == 6
        line = undated(proc.err).splitlines()[0]
        assert line.startswith("isconf: error: transaction 1 halted: started 3 times without ending (interrupted_max "
                               "3), vanishing each time without a reboot: the agent was killed (SIGKILL, the OOM "
                               "killer, or the command killing it), so it is not started again."), line
        assert "isconf skip 1 -m WHY" in line and "interrupted_max" in line and "reboot' entry" not in line
    assert [e["interrupted"] for e in history(host) if e["event"] == "failed"] == [3, 3]


@pytest.mark.parametrize("moved,rebooted", [([0, 1, 2], 3), ([0], 1)], ids=["after-each", "after-the-first"])
def test_the_halt_says_the_machine_rebooted_during_the_attempts_that_vanished(long_host, daemons, moved,
                                                                                rebooted):
    # Attempt n (0: the first) was made under a boot of its own: the machine rebooted before the next start.
    host = long_host
    for _ in range(3):
        stopped_up(host, signal.SIGKILL, daemons)
    rewrite_history(host, lambda e, n: e.update(boot_id=other_boot(n + 1)) if e["event"] == "started" and n in moved
                    else None)
    report = host.status()
    assert report["interrupted"]["attempts"] == 3 and report["interrupted"]["rebooted"] == rebooted, report
    assert "interrupted 3 of 3 times, the machine rebooting during %d: the next 'up' halts it" % rebooted \
        in host("status").out
    proc = host("up", expect="failed")
    line = undated(proc.err).splitlines()[0]
    assert ("halted: started 3 times without ending (interrupted_max 3), the machine rebooting during %d of them: it "
            "probably reboots or powers off the machine itself, so it is not started again. A reboot belongs in a "
            "'reboot' entry" % rebooted) in line, line
    assert attempts(host) == 3


def test_a_signal_followed_by_a_reboot_counts_as_init_stopping_the_agent_for_a_shutdown(long_host, daemons):
    # An exec that reboots the machine: systemd stops the agent with SIGTERM as the machine goes down, and
    # the agent records it; the next start is under a new boot id.  Three of them halt it: no boot loop.
    host = long_host
    for _ in range(3):
        stopped_up(host, signal.SIGTERM, daemons)
    rewrite_history(host, lambda e, n: e.update(boot_id=other_boot(n + 1)) if e["event"] == "started" else None)
    report = host.status()
    assert report["interrupted"]["attempts"] == 3 and report["interrupted"]["signals"] == [], report
    proc = host("up", expect="failed")
    assert "started 3 times without ending (interrupted_max 3), the machine rebooting during 3 of them" in proc.err
    assert attempts(host) == 3


def test_a_history_without_boot_ids_still_halts_with_the_old_wording(long_host, daemons):
    # Starts recorded by an older isconf: whether the machine rebooted is unknown.
    host = long_host
    for _ in range(3):
        stopped_up(host, signal.SIGKILL, daemons)
    rewrite_history(host, lambda e, n: e.pop("boot_id", None))
    assert host.status()["interrupted"]["attempts"] == 3
    proc = host("up", expect="failed")
    assert "started 3 times without ending (interrupted_max 3): it probably reboots or powers off the machine, or " \
        "kills the agent, so it is not started again. A reboot belongs in a 'reboot' entry" in proc.err
    assert attempts(host) == 3


def test_a_signal_outside_a_transaction_records_nothing(long_host, daemons):
    # The run is stopped while it waits for a mirror that never answers: the attempt a killed run left
    # behind stays one that vanished (it is not this run's to end).
    host = long_host
    stopped_up(host, signal.SIGKILL, daemons)
    before = history(host)
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        config = host.path("/etc/isconf/isconf.conf")
        with open(config) as f:
            text = f.read()
        text, found = re.subn(r"(?m)^urls = .*$", "urls = http://127.0.0.1:%d/" % silent.getsockname()[1], text)
        assert found == 1, text
        with open(config, "w") as f:
            f.write(text)
        agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            silent.settimeout(60)
            connection, _ = silent.accept()  # the agent is waiting for the answer
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(60) == 128 + signal.SIGTERM
            connection.close()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(30)
    finally:
        silent.close()
    assert history(host) == before
    report = host.status()
    assert report["interrupted"]["attempts"] == 1 and report["interrupted"]["signal"] is None, report


COUNT = "echo $ISCONF_SEQ >> /tmp/runs"


def runs(host):
    try:
        with open(host.path("/tmp/runs")) as f:
            return [int(n) for n in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture
def batch_host(author, host, busybox_root):
    """A host (interrupted_max 1) whose two first transactions count their runs and whose third is LONG:
    the done records of the first two wait in a batch while it runs."""
    busybox_root(host.root)
    author.commit(*[["exec", "--no-run", "--", "/bin/sh", "-c", command] for command in (COUNT, COUNT, LONG)])
    host.init(author.repo, author.keys, "--interrupted-max", "1")
    return host


def test_the_starts_of_a_batch_a_crash_lost_count_only_for_the_transaction_that_was_running(batch_host):
    # What a SIGKILL or a power cut during the third leaves: three starts, the done records of the first
    # two lost with their batch.  They ended (the next start is a later transaction's): run again, not
    # halted; the third never did: at interrupted_max 1, halted.
    host = batch_host
    open(host.path("/tmp/go"), "w").close()
    host("up", expect="ok")
    rewrite = [e for e in history(host) if e["event"] == "started"]
    with open(host.state("history"), "w") as f:
        f.write("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in rewrite))
    assert host.status()["interrupted"]["seq"] == 3
    proc = host("up", expect="failed")
    assert "transaction 3 halted: started 1 time without ending (interrupted_max 1)" in proc.err, proc.err
    assert runs(host) == [1, 2, 1, 2] and attempts(host) == 1
    assert [(e["event"], e["seq"]) for e in history(host)][3:] == [
        ("started", 1), ("started", 2), ("done", 1), ("done", 2), ("failed", 3)]


def test_a_signal_during_a_batch_records_what_ended_before_it_then_the_interruption(batch_host, daemons):
    host = batch_host
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not os.path.exists(host.path("/tmp/pid")):
            assert agent.poll() is None and time.time() < deadline, "the command never started"
            time.sleep(0.05)
        time.sleep(0.2)  # the shell wrote its pid: it is the sleep now
        with open(host.path("/tmp/pid")) as f:
            daemons.append(int(f.read()))
        report = host.status()  # the first two applied, not yet recorded: the batch is in flight
        assert report["state"] == "running" and report["running"]["transaction"]["seq"] == 3, report
        assert report["applied_seq"] == 0 and runs(host) == [1, 2]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 128 + signal.SIGTERM
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    # (A second between two commands of a loaded machine ends the batch before the third starts.)
    assert [(e["event"], e["seq"]) for e in history(host)] in (
        [("started", 1), ("started", 2), ("started", 3), ("done", 1), ("done", 2), ("interrupted", 3)],
        [("started", 1), ("started", 2), ("done", 1), ("done", 2), ("started", 3), ("interrupted", 3)])
    # Systemd's SIGTERM as the machine went down: the next start is under another boot id.  The next run,
    # reading its history back from the end, finds that start before the done records: at interrupted_max
    # 1, halted.
    rewrite_history(host, lambda e, n: e.update(boot_id=other_boot(1)) if e["event"] == "started" else None)
    open(host.path("/tmp/go"), "w").close()
    proc = host("up", expect="failed")
    assert "transaction 3 halted: started 1 time without ending (interrupted_max 1), the machine rebooting " \
           "during 1 of them" in proc.err, proc.err
    assert runs(host) == [1, 2] and attempts(host) == 1
