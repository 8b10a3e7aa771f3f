"""An up-to-date 'up' does only what it must: read the config, one request for the head, check its
signature, compare, record, exit.  Counted by running the real agent under strace."""

import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, error_line, strace_calls

STATE = "var/lib/isconf"
TRACED = "openat,open,mkdir,mkdirat,connect,fsync,fdatasync,sync,syncfs,rename,renameat,renameat2"
BARRIERS = ("fsync", "fdatasync", "sync", "syncfs")


def traced_up(host, trace):
    """{syscall: [path or text]}: what one 'up' of host did, by strace -f -y (each descriptor shown as
    its path); the opens that succeeded by the path they opened."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (apt-get install strace)")
    proc = subprocess.run(["strace", "-f", "-y", "-qq", "-s", "256", "-e", "trace=" + TRACED, "-o", trace,
                           sys.executable, "-I", ISCONF, "--root", host.root, "up"],
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"is up to date" in proc.stdout, proc.stdout.decode()
    calls = {}
    for _, text in strace_calls(trace):
        call = re.match(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<(.*)>)?", text)
        if not call or (call.group(3).startswith("-") and call.group(1) != "connect"):  # non-blocking
            continue
        name, args, opened = call.group(1), call.group(2), call.group(4)
        if name in ("open", "openat"):
            calls.setdefault("open", []).append(opened or args)
        else:
            calls.setdefault(name, []).append(args)
    return calls


def up_to_date_host(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo ran >> /tmp/count"])
    host.init(server.url, keys)
    host("up", expect="ok")
    return host


def test_an_up_to_date_up_makes_one_request_and_no_barrier_and_leaves_what_it_does_not_need(
        author, server, keys, host, busybox_root, tmp_path):
    up_to_date_host(author, server, keys, host, busybox_root)
    state = os.path.realpath(host.state())
    before = host.status()
    time.sleep(1.1)  # last-success has whole seconds
    mark = server.mark()
    calls = traced_up(host, str(tmp_path / "trace"))
    requests = [line.split('"GET ')[1].split()[0] for line in server.requests()[mark:]]
    assert requests == ["/branches/web/head"], requests
    assert len([c for c in calls.get("connect", []) if "AF_INET" in c]) == 1, calls.get("connect")
    opened = calls.get("open", [])
    assert [p for p in opened if p.startswith((state + "/objects", state + "/logs"))] == [], opened
    assert [p for p in opened if "boot_id" in p] == [], opened
    assert opened.count(state + "/lock") == 1, opened
    assert opened.count(state + "/head") == 1, opened
    assert opened.count(state + "/state-format") == 1, opened
    assert [c for c in calls.get("mkdir", []) + calls.get("mkdirat", []) if "objects" in c or "logs" in c] == []
    barriers = dict((name, calls[name]) for name in BARRIERS if calls.get(name))
    assert barriers == {}, barriers
    # What it records stays true: this run's result, and the time of this success.
    after = host.status()
    assert after["last_run"]["result"] == "ok" and after["last_run"]["applied"] == 0, after["last_run"]
    assert after["last_run"]["end"] > before["last_run"]["end"], (before["last_run"], after["last_run"])
    assert after["last_success"] > before["last_success"], (before["last_success"], after["last_success"])
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"


def test_objects_a_stopped_run_left_staged_are_dropped_by_the_next_up_to_date_run(
        author, server, keys, host, busybox_root, tmp_path):
    # A run killed after its last transaction, before it dropped what it staged: objects/ is newer than
    # the last success.  The next run, up to date, drops it; the one after no longer looks in objects/.
    up_to_date_host(author, server, keys, host, busybox_root)
    left = host.state("objects", "ab" * 32)
    time.sleep(0.05)
    with open(left, "wb") as f:
        f.write(b"staged by a run that was killed\n")
    host("up", expect="ok")
    assert os.listdir(host.state("objects")) == []
    state = os.path.realpath(host.state())
    opened = traced_up(host, str(tmp_path / "trace")).get("open", [])
    assert [p for p in opened if p.startswith(state + "/objects")] == [], opened


@pytest.mark.parametrize("sub", ["objects", "logs"])
def test_an_up_to_date_up_still_refuses_a_state_subdirectory_others_can_write(author, server, keys, host,
                                                                              busybox_root, sub):
    up_to_date_host(author, server, keys, host, busybox_root)
    path = host.state(sub)
    os.chmod(path, 0o777)
    proc = host("up", expect="state")
    assert error_line(proc) == ("isconf: error: %s is writable by group and others (owner root, mode 0777): run "
                                "'chmod go-w %s'" % (path, path))
    os.chmod(path, 0o700)
    host("up", expect="ok")


# --- a catch-up costs what is new: what a transaction asks of the history ---------------------------

def attempts_by_scan(events, seq, entry_id):
    """The attempts at one entry History.interruptions tallies, found as its docstring says by one scan of
    every event: the reference."""
    attempts, following = [], False
    for event in events:
        if (event["seq"], event["id"]) != (seq, entry_id):
            if following and event["event"] == "started":
                following = False
                if event["seq"] > seq and attempts[-1][1] is None:
                    attempts[-1][1] = "applied"
            continue
        kind = event["event"]
        following = kind == "started"
        if kind == "started":
            attempts.append([event.get("boot_id"), None])
        elif kind in ("done", "authored", "skipped", "retracted"):
            attempts = []
        elif attempts and attempts[-1][1] is None:
            if kind == "failed" and "interrupted" not in event:
                attempts[-1][1] = "failed"
            elif kind == "interrupted":
                attempts[-1][1] = str(event.get("signal") or "a signal")
    return attempts


class Entry(object):
    def __init__(self, seq, entry_id):
        self.seq, self.id = seq, entry_id


def test_a_transactions_interruptions_read_through_the_history_index_are_those_a_whole_scan_finds(
        isconf, tmp_path, seed):
    # The index is built as records are added (a run asks after each transaction): asked between appends,
    # it answers as one scan of everything would.
    rng = random.Random(seed)
    kinds = ["started"] * 3 + ["done", "failed", "interrupted", "skipped", "retracted", "authored", "baseline"]
    for trial in range(300):
        directory = str(tmp_path / ("state-%d" % trial))
        os.makedirs(directory)
        state = isconf.StateDir(os.open(directory, os.O_RDONLY | os.O_DIRECTORY), directory)
        history = isconf.History(state)
        for _ in range(rng.randint(1, 5)):
            records = []
            for _ in range(rng.randint(0, 6)):
                seq = rng.randint(1, 4)
                record = {"event": rng.choice(kinds), "seq": seq, "id": "%d%s" % (seq, "b" if rng.random() < 0.2
                                                                                   else "a")}
                if record["event"] == "started" and rng.random() < 0.8:
                    record["boot_id"] = rng.choice(["boot-1", "boot-2"])
                if record["event"] == "failed" and rng.random() < 0.3:
                    record["interrupted"] = 3
                if record["event"] == "interrupted" and rng.random() < 0.7:
                    record["signal"] = "SIGTERM"
                records.append(record)
            if records:
                history.record_all(records)
            for seq in range(1, 5):
                for entry_id in ("%da" % seq, "%db" % seq):
                    boot = rng.choice([None, "boot-1", "boot-2"])
                    assert history.interruptions(Entry(seq, entry_id), boot) == isconf.History.tally(
                        attempts_by_scan(history.events, seq, entry_id), boot), history.events
        if history.fd is not None:
            os.close(history.fd)
        state.close()
