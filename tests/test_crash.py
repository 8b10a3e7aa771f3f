"""Crashes, power cuts, full disks (rule 5): random SIGKILLs (and SIGTERMs, SIGINTs) over a journal of every kind,
a durability audit of an uninterrupted run from its system calls, and a full disk during a snap.

The agent runs from inside the host root (as in test_upgrade) so that the journal can replace
it and its interpreter like any other file.  ISCONF_SEED and ISCONF_KILLS (see conftest.py)
set the kill harness's seed and how many kills it lands.
"""

import collections
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import (AGENT, AUTHOR, ISCONF, KILLS, append_entry, build, error_line, extents, install_busybox, put,
                      replace_file, strace_calls, undated)

OLD, V1, V2 = b"old\n", b"version one\n", b"version two\n"
BIG = 4 << 20  # large enough that a kill can land while it is being written
STATE = "var/lib/isconf"
CONFIG = "etc/isconf/isconf.conf"
# The harness's hosts halt a transaction started this many times without ending: 1, so that every kill that
# lands in a transaction meets the rule, and the harness checks the halt and recovers as an admin would.
INTERRUPTED_MAX = 1
INTERRUPTED_MOST = 1000  # the largest interrupted_max a config may hold (README, 'init --interrupted-max')


def pattern(seed, size):
    block = hashlib.sha256(seed).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


BIG_OLD, BIG_V1, BIG_V2 = (pattern(s, BIG) for s in (b"old", b"v1", b"v2"))
TRANSACTIONS = 9  # the journal of every_kind
VERSIONS = {"etc/app/a.conf": {OLD, V1, V2}, "etc/app/big.bin": {BIG_OLD, BIG_V1, BIG_V2}}


def pyenv(minor):
    found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % minor))
    if not found:
        pytest.fail("no Python %s under /root/.pyenv: the harness swaps interpreters under the agent" % minor)
    return found[-1]


def counted():
    """An exec that appends its own sequence number to /var/runs, so each run of it is visible, then
    lingers a moment, so that some kills land between its effect and its 'done'."""
    return ["exec", "--no-run", "--", "/bin/sh", "-c", "echo $ISCONF_SEQ >> /var/runs; sleep 0.2"]


@pytest.fixture
def every_kind(tmp_path, author, server, keys):
    """A template host (busybox, agent 1.0.0 inside it, Python 3.11 as /usr/bin/python3, old
    versions of two files) initialised against a journal of every kind; returns its path."""
    old_python, new_python = pyenv("3.11"), pyenv("3.12")
    src = str(tmp_path / "src")
    install_busybox(src)
    replace_file(src, "etc/app/a.conf", V1, 0o640, 33, 33)
    replace_file(src, "etc/app/big.bin", BIG_V1)
    os.symlink("a.conf", os.path.join(src, "etc/app/link"))
    os.mkdir(os.path.join(src, "etc/app/d"))
    os.chmod(os.path.join(src, "etc/app/d"), 0o750)
    replace_file(src, "etc/app/h1", b"hard\n", 0o600)
    os.link(os.path.join(src, "etc/app/h1"), os.path.join(src, "etc/app/h2"))
    with open(replace_file(src, "etc/app/sparse", b""), "r+b") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"data in the middle")
    snap = lambda *paths: ["--root", src, "snap"] + ["/" + p for p in paths]  # noqa: E731
    author.commit(counted(), snap("etc/app/a.conf", "etc/app/big.bin", "etc/app/link", "etc/app/d",
                                  "etc/app/h1", "etc/app/h2", "etc/app/sparse"), counted())
    replace_file(src, "etc/app/a.conf", V2, 0o600)
    replace_file(src, "etc/app/big.bin", BIG_V2, 0o644)
    put(src, AGENT, build("1.1.0"))
    author.commit(snap("etc/app/a.conf", "etc/app/big.bin"), counted(), snap(AGENT.lstrip("/")), counted(),
                  ["exec", "--no-run", "--", "/bin/ln", "-sf", new_python, "/usr/bin/python3"], counted())
    root = str(tmp_path / "template")
    install_busybox(root)
    os.symlink("busybox", os.path.join(root, "bin/ln"))
    os.makedirs(os.path.join(root, "usr/bin"))
    os.makedirs(os.path.join(root, "var"))
    os.symlink(old_python, os.path.join(root, "usr/bin/python3"))
    put(root, AGENT, build("1.0.0"))
    replace_file(root, "etc/app/a.conf", OLD)
    replace_file(root, "etc/app/big.bin", BIG_OLD)
    code, out, err = finish(agent(root, "init", server.url, "--branch", "web", "--signers", keys.signers,
                                  "--interrupted-max", str(INTERRUPTED_MAX)))
    assert code == 0, err
    assert config(root) == config(root, INTERRUPTED_MAX)
    return root


def agent(root, *args, **kw):
    """The agent inside root, run by the root's own /usr/bin/python3 (whatever it points to now)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8"}
    return subprocess.Popen(list(kw.get("prefix", [])) + [
        os.path.join(root, "usr/bin/python3"), "-I", os.path.join(root, AGENT.lstrip("/")), "--root", root]
        + list(args), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def copy_host(template, dest):
    shutil.copytree(template, dest, symlinks=True)
    return dest


def reap(root):
    """Kill whatever a killed agent left running: commands in its chroot, a self-test of its
    new agent.  Returns how many there were."""
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            inside = os.readlink("/proc/%s/root" % pid) == root
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                named = root.encode() in f.read()
        except OSError:
            continue
        if inside or named:
            found += 1
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


def history(root):
    """Events of the host's history; a torn last line (a kill mid-append) is left out."""
    events = []
    try:
        with open(os.path.join(root, STATE, "history"), "rb") as f:
            for line in f.read().splitlines():
                try:
                    events.append(json.loads(line.decode()))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return events


def config(root, interrupted_max=None):
    """The host's config text; with interrupted_max, as it reads once that value is set in it."""
    with open(os.path.join(root, CONFIG)) as f:
        text = f.read()
    if interrupted_max is not None:
        text, found = re.subn(r"(?m)^interrupted_max = \d+$", "interrupted_max = %d" % interrupted_max, text)
        assert found == 1, text
    return text


def raise_interrupted_max(root, most):
    """What an admin does on a host halted by interrupted_max, to let the transaction run again: the
    config edited by hand (README: 'the file can be edited by hand')."""
    text = config(root, most)
    with open(os.path.join(root, CONFIG), "w") as f:
        f.write(text)


def counted_starts(events, seq):
    """How many attempts at seq count toward interrupted_max (README, interrupted_max), by the history.

    The harness's transactions never fail and are never skipped, and the machine never reboots under
    them, so an attempt counts when its 'started' is followed neither by an 'interrupted' record of a
    signal the agent caught nor, as the next start, by a later transaction's start: then it ended applied,
    its done record waiting for the batch's barrier when SIGKILL came (group commit)."""
    n = 0
    for i, event in enumerate(events):
        if event["seq"] != seq or event["event"] != "started":
            continue
        after = next((e for e in events[i + 1:] if e["event"] == "started" or
                      (e["seq"] == seq and e["event"] == "interrupted")), None)
        n += not (after and (after["event"] == "interrupted" or after["seq"] > seq))
    return n


def attempts(events):
    """(seq, halt, n, started): the first transaction not done; the first from it on that a run halts
    instead of starting it, having run again those before it (their done records lost with a batch), by
    how many of its attempts count (None, and the most any counts: no halt); the transactions started
    and not done.  The agent halts a transaction once n reaches interrupted_max."""
    done = {e["seq"] for e in events if e["event"] == "done"}
    seq = min(set(range(1, TRANSACTIONS + 1)) - done, default=None)
    started = {e["seq"] for e in events if e["event"] == "started"} - done
    counts = [(s, counted_starts(events, s)) for s in sorted(started)]
    return seq, counts, started


def runs(root):
    try:
        with open(os.path.join(root, "var/runs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def tree(root):
    """Everything under root outside the host's state and the run counter: content, mode, owner,
    link targets, file mtimes, data extents, and which names are one file."""
    seen, inodes = {}, collections.defaultdict(set)
    for top, dirs, files in os.walk(root):
        rel_top = os.path.relpath(top, root)
        if rel_top == STATE:
            dirs[:] = []
            continue
        for name in dirs + files:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, root)
            if rel == "var/runs" or rel == STATE:
                continue
            st = os.lstat(p)
            what = [st.st_mode, st.st_uid, st.st_gid]
            if os.path.islink(p):
                what.append(os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    what += [hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, extents(p)]
                if st.st_nlink > 1:
                    inodes[st.st_ino].add(rel)
            seen[rel] = what
    return seen, {frozenset(names) for names in inodes.values()}


class Watcher(threading.Thread):
    """Reads the snapped files over and over while a run goes on: what it ever saw that is not
    one whole version is torn."""

    def __init__(self, root):
        threading.Thread.__init__(self, daemon=True)
        self.root, self.torn, self.reads, self.halt = root, [], 0, threading.Event()
        self.start()

    def run(self):
        while not self.halt.is_set():
            for rel, versions in VERSIONS.items():
                with open(os.path.join(self.root, rel), "rb") as f:
                    data = f.read()
                self.reads += 1
                if data not in versions:
                    self.torn.append((rel, len(data)))

    def stop(self):
        self.halt.set()
        self.join()
        return self.torn


HALTED = ("isconf: error: transaction %d halted: started %s without ending (interrupted_max %d), vanishing each "
          "time without a reboot: ")


def check_halted(root, code, err, before, pending, seq, count, most):
    """A run the history says meets interrupted_max at seq: exit 1, the one 'halted' line, nothing run but
    the transactions from pending to it (run again: their done records were lost with a batch), and the
    halt recorded with its count."""
    lines = [l for l in undated(err).splitlines() if l.startswith("isconf: error:")]
    assert code == 1 and len(lines) == 1, (code, err)
    assert lines[0].startswith(HALTED % (seq, "%d time%s" % (count, "" if count == 1 else "s"), most)), lines[0]
    assert runs(root) == before + [s for s in (1, 3, 5, 7, 9) if pending <= s < seq], (before, runs(root))
    last = history(root)[-1]
    assert (last["event"], last["seq"], last.get("interrupted")) == ("failed", seq, count), last


def check_kill_point(root):
    """At any moment a snapped file is one whole version, never a mix."""
    for rel, versions in VERSIONS.items():
        with open(os.path.join(root, rel), "rb") as f:
            assert f.read() in versions, "%s is torn" % rel


# How the harness stops a run: half the kills are SIGKILLs, which alone leave an attempt without an end.
STOPS = (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def stopped_by(stop, code, err):
    """Whether a run ended as the signal stop ends one: a signal the agent catches with 128 + the signal;
    while the interpreter starts (a re-exec's too), before the handlers are in place, by the signal itself;
    a SIGINT before any of the script runs, with exit 1 and the interpreter's own KeyboardInterrupt: while
    it compiles the script (that one line), or in a step of its own start ('Fatal Python error: init_...':
    init_import_site, init_sys_streams; a traceback through the import machinery only, never through the
    agent's file)."""
    if code == -stop or (stop != signal.SIGKILL and code == 128 + stop):
        return True
    if stop != signal.SIGINT or code != 1 or not err.rstrip().endswith("KeyboardInterrupt"):
        return False
    return err.strip() == "KeyboardInterrupt" or (
        re.match(r"Fatal Python error: init_\w+: ", err) is not None and os.path.basename(AGENT) not in err)


def test_random_kills_over_every_kind_end_as_an_uninterrupted_run(every_kind, tmp_path, seed):
    # A transaction the SIGKILLs interrupt interrupted_max times is halted (exit 1): the harness, reading the
    # history, knows beforehand which run that is, checks it, raises interrupted_max as an admin would, and carries
    # on.  A SIGTERM or SIGINT the agent catches ends its attempt with a record of it, which never counts.
    reference = copy_host(every_kind, str(tmp_path / "reference"))
    started = time.monotonic()
    code, out, err = finish(agent(reference, "up"))
    duration = time.monotonic() - started
    assert code == 0, err
    assert sorted(runs(reference)) == [1, 3, 5, 7, 9] and out.count("re-executing") == 2
    assert [e["seq"] for e in history(reference) if e["event"] == "done"] == list(range(1, TRANSACTIONS + 1))
    expected = tree(reference)
    rng = random.Random(seed)
    kills, rounds, halts = 0, 0, 0
    reads, landed = 0, collections.Counter()  # the transaction each kill interrupted (0: none), for the figures
    stops = collections.Counter()  # the kills by signal, for the figures
    while kills < KILLS:
        rounds += 1
        root = copy_host(every_kind, str(tmp_path / ("round%d" % rounds)))
        most = INTERRUPTED_MAX
        while True:
            before, events = runs(root), history(root)
            done = {e["seq"] for e in events if e["event"] == "done"}
            pending, counts, started = attempts(events)
            halt, count = next(((s, n) for s, n in counts if n >= most), (None, max([0] + [n for _, n in counts])))
            halting = halt is not None
            # At the largest interrupted_max a config may hold, a transaction one start short of it is left to end.
            spare = halting or (count == most - 1 and most == INTERRUPTED_MOST)
            when, stop = rng.uniform(0, duration), rng.choice(STOPS)
            proc, watcher = agent(root, "up"), Watcher(root)
            try:
                proc.wait(None if spare else when)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, stop)
            code, out, err = finish(proc)
            assert not watcher.stop(), "seen torn (name, size): %s" % watcher.torn[:5]
            reads += watcher.reads
            new = history(root)[len(events):]
            stopped = code != 0 and not halting
            if stopped:
                assert stopped_by(stop, code, err), (signal.Signals(stop).name, code, err)
                if code == 128 + stop:  # the agent caught it: the attempt it stopped, if any, ends with a record of it
                    assert not new or new[-1]["event"] != "started", (signal.Signals(stop).name, new)
                    assert [e.get("signal") for e in new if e["event"] == "interrupted"] in (
                        [], [signal.Signals(stop).name]), new
                landed[new[-1]["seq"] if new and new[-1]["event"] in ("started", "interrupted") else 0] += 1
                stops[signal.Signals(stop).name] += 1
            reap(root)
            check_kill_point(root)
            again = runs(root)[len(before):]
            # Only transactions started before and not recorded done run again (the one interrupted, and those
            # whose done records a SIGKILL lost with their batch); none recorded done ever does.
            assert not done & set(again), (done, again)
            assert set(again) & set(before) <= started, (before, again, started)
            if halting:
                check_halted(root, code, err, before, pending, halt, count, most)
                halts += 1
                most = count + 1
                raise_interrupted_max(root, most)
                continue
            if not stopped:
                assert code == 0, err
                break
            kills += 1
        assert set(runs(root)) == {1, 3, 5, 7, 9}
        (got, links), (want, want_links) = tree(root), expected
        differ = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p) and p != CONFIG)
        assert not differ and links == want_links, "round %d differs from the uninterrupted run: %s" % (
            rounds, [(p, got.get(p), want.get(p)) for p in differ] or (links, want_links))
        assert config(root) == config(reference, most)  # and the config by interrupted_max alone
        shutil.rmtree(root)
    print("%d kills (%s) in %d rounds, by transaction interrupted %s; %d halted at interrupted_max and raised; %d "
          "reads of snapped files during the runs; an uninterrupted run takes %.2fs"
          % (kills, ", ".join("%d %s" % (n, name) for name, n in sorted(stops.items())), rounds,
             sorted(landed.items()), halts, reads, duration))


TRACED = ("openat,write,pwrite64,fsync,fdatasync,rename,renameat,renameat2,close,sync,syncfs,mkdir,mkdirat,"
          "execve")
BARRIERS = ("fsync", "fdatasync", "syncfs", "sync")


def strace_prefix(trace):
    if not shutil.which("strace"):
        pytest.fail("strace is not installed; .ci/run installs it")
    return ["strace", "-f", "-y", "-qq", "-s", "256", "-e", "trace=" + TRACED, "-o", trace]


def history_size(root):
    try:
        return os.path.getsize(os.path.join(root, STATE, "history"))
    except FileNotFoundError:
        return 0


def audit(trace, root, history_from, reboot_marker=None):
    """Check from an strace -f -y log of one run the order of its disk barriers (group commit, rule 17):

    - no done record is written, even to the page cache, while anything its transactions wrote under root
      (a file written, a directory renamed or made a directory in) is not yet on disk: fsync'd, or the
      root's file system synced by syncfs(2) of the root (a syncfs of another file system covers nothing);
      sync(2) of the whole machine is never called;
    - each history write is fsync'd before the next;
    - the records are flushed (no transaction started and not yet recorded done, failed or interrupted)
      before a re-exec of the agent (execve in its own process), before the reboot command (an execve whose
      arguments hold reboot_marker), when a failure is recorded (only the failed one is open), and at the end.

    Which records each history write holds is read from the history file itself: the writes append, from
    history_from bytes on, each as many bytes as it returned.  Returns counts: dones, barriers (fsync,
    fdatasync, syncfs and sync calls of every process), syncfs, reexecs, reboots, failures, exec_writes
    (files the commands wrote, which only the syncfs covered)."""
    state, history_path = os.path.join(root, STATE) + "/", os.path.join(root, STATE, "history")
    with open(history_path, "rb") as f:
        f.seek(history_from)
        appended = f.read()
    dirty, unsynced_history = {}, False
    counts = collections.Counter()
    open_seqs, offset, main = set(), 0, None
    for pid, text in strace_calls(trace):
        main = main or pid
        call = re.match(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)", text, re.S)
        if not call or call.group(3).startswith("-"):
            continue
        name, args, result = call.group(1), call.group(2), int(call.group(3))
        fds = re.findall(r"\d+<([^>]*)>", args)
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        if name in BARRIERS:
            counts["barriers"] += 1
        if name in ("write", "pwrite64") and fds:
            path = fds[0]
            if path == history_path:
                assert not unsynced_history, "history record written before the last one was fsync'd"
                records = [json.loads(r) for r in appended[offset:offset + result].splitlines()]
                offset += result
                for record in records:
                    event, seq = record["event"], record["seq"]
                    if event == "done":
                        assert not dirty, "done of %d recorded before these were on disk: %s" % (seq, sorted(dirty))
                        counts["dones"] += 1
                    if event == "failed":
                        assert open_seqs <= {seq}, "failure of %d recorded before the done records of %s" % (
                            seq, sorted(open_seqs - {seq}))
                        counts["failures"] += 1
                    if event == "started":
                        open_seqs.add(seq)
                    elif event in ("done", "failed", "interrupted"):
                        open_seqs.discard(seq)
                unsynced_history = True
            elif path.startswith(root + "/") and not path.startswith(state):
                dirty[path] = "written"
                counts["exec_writes"] += pid != main
        elif name in ("fsync", "fdatasync") and fds:
            dirty.pop(fds[0], None)
            if fds[0] == history_path:
                unsynced_history = False
        elif name == "syncfs":
            counts["syncfs"] += 1
            if fds and fds[0] == root:
                dirty.clear()
        elif name == "sync":
            raise AssertionError("sync(2) of the whole machine called, not syncfs(2) of the root's file system")
        elif name == "execve":
            if pid == main and counts["execs_of_agent"]:
                assert not open_seqs, "re-executed with transactions %s not recorded done" % sorted(open_seqs)
                counts["reexecs"] += 1
            elif reboot_marker and reboot_marker in args:
                assert not open_seqs and not unsynced_history, (
                    "reboot command started with transactions %s not recorded done" % sorted(open_seqs))
                counts["reboots"] += 1
            counts["execs_of_agent"] += pid == main
        elif name in ("mkdir", "mkdirat"):
            made = strings[0] if name == "mkdir" else os.path.join(fds[0], strings[0])
            if made.startswith(root + "/") and not made.startswith(state):
                dirty[os.path.dirname(made)] = "made a directory in"
        elif name.startswith("rename"):
            if name == "rename":
                old, new = strings[:2]
            else:
                old, new = (os.path.join(d, s) for d, s in zip(fds[:2], strings[:2]))
            if not new.startswith(root + "/") or new.startswith(state):
                continue
            if dirty.pop(old, None):
                dirty[new] = "written"
            dirty[os.path.dirname(new)] = "renamed into"
    assert offset == len(appended), "the history grew by %d bytes the trace does not show" % (len(appended) - offset)
    assert not unsynced_history, "the last history record was never fsync'd"
    assert not open_seqs, "the run ended with transactions %s not recorded done" % sorted(open_seqs)
    return counts


def test_each_done_record_follows_the_fsync_of_everything_its_transaction_wrote(every_kind, tmp_path):
    # Over every kind, two re-execs among them (a new agent, then a new interpreter).
    root = copy_host(every_kind, str(tmp_path / "traced"))
    trace, before = str(tmp_path / "trace"), history_size(root)
    code, out, err = finish(agent(root, "up", prefix=strace_prefix(trace)))
    assert code == 0, err
    counts = audit(trace, root, before)
    assert counts["dones"] == 9 and counts["reexecs"] == 2 and counts["exec_writes"], counts


CATCH_UP = 50


def test_a_catch_up_shares_its_barriers_and_flushes_before_a_reboot_and_a_failure(author, host, busybox_root,
                                                                                   keys, tmp_path):
    # 50 execs, a reboot entry, 3 more execs and a failing one.  The first run (up -r) ends at the reboot
    # command, the second at the failure; between them every transaction ran once and is recorded done.
    busybox_root(host.root)
    os.makedirs(host.path("/var"))
    count = "echo $ISCONF_SEQ >> /var/runs"
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", count])
    for _ in range(CATCH_UP - 1):
        append_entry(author, kind="exec", argv=["/bin/sh", "-c", count], cwd="/")
    append_entry(author, kind="reboot")
    for _ in range(3):
        append_entry(author, kind="exec", argv=["/bin/sh", "-c", count], cwd="/")
    append_entry(author, kind="exec", argv=["/bin/false"], cwd="/")
    sign_head(author, keys)
    marker = "isconf-test-reboot-%d" % os.getpid()
    host.init(author.repo, keys, "--reboot-command", "/bin/echo " + marker)
    trace, before = str(tmp_path / "trace-1"), history_size(host.root)
    code, out, err = finish(agent_of(host, "up", "-r", prefix=strace_prefix(trace)))
    assert code == 0 and marker in out, (code, out, err)
    first = audit(trace, host.root, before, marker)
    assert first["dones"] == CATCH_UP + 1 and first["reboots"] == 1 and first["exec_writes"] >= CATCH_UP, first
    # Three barriers each before (started, sync, done): now a start each, and a syncfs and an fsync per batch,
    # and what any run costs (the fetched journal and head, the run's own record).
    assert first["barriers"] < 2 * CATCH_UP, first
    assert first["syncfs"] <= -(-CATCH_UP // 64) + 1, first
    trace, before = str(tmp_path / "trace-2"), history_size(host.root)
    code, out, err = finish(agent_of(host, "up", prefix=strace_prefix(trace)))
    assert code == 1, (code, out, err)
    second = audit(trace, host.root, before)
    assert second["dones"] == 3 and second["failures"] == 1, second
    with open(host.path("/var/runs")) as f:
        assert [int(n) for n in f.read().split()] == list(range(1, CATCH_UP + 1)) + [52, 53, 54]


def test_a_snap_fsyncs_each_file_before_its_rename_and_each_directory_once(author, host, busybox_root, tmp_path):
    # 30 files in one directory, 3 in another: 33 file fsyncs, then one of each directory, not one per file.
    src = str(tmp_path / "src")
    for n in range(33):
        path = os.path.join(src, "etc/many" if n < 30 else "etc/few", "f%d" % n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("file %d\n" % n)
    busybox_root(host.root)
    author("lock", "-m", "many files")
    author("--root", src, "snap", *["/etc/many/f%d" % n for n in range(30)] + ["/etc/few/f%d" % n for n in (30, 31, 32)])
    author.ci()
    host.init(author.repo, author.keys)
    trace, before = str(tmp_path / "trace"), history_size(host.root)
    code, out, err = finish(agent_of(host, "up", prefix=strace_prefix(trace)))
    assert code == 0, err
    audit(trace, host.root, before)
    synced = collections.Counter()
    with open(trace) as f:
        for line in f:
            found = re.search(r"\bfsync\(\d+<([^>]*)>\) = 0", line)
            if found and found.group(1).startswith(host.path("/etc/")):
                synced[os.path.relpath(found.group(1), host.root)] += 1
    directories = {path: n for path, n in synced.items() if not re.search(r"/f\d+$|isconf", path)}
    assert directories == {"etc/many": 1, "etc/few": 1}, synced
    assert sum(synced.values()) == 33 + 2, synced


def sign_head(author, keys):
    """Sign the head append_entry rewrote, as ci would."""
    os.unlink(author.path("head.sig"))
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", author.path("head")],
                   check=True, stdin=subprocess.DEVNULL)


def agent_of(host, *args, **kw):
    """The agent under test run on host (not from inside it) by this interpreter."""
    return subprocess.Popen(list(kw.get("prefix", [])) + [sys.executable, "-I", ISCONF, "--root", host.root]
                            + list(args), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.fixture
def small_disk(host):
    """A 1 MiB tmpfs at the host's /etc/big; unmounted afterwards."""
    mount = host.path("/etc/big")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], check=True)
    yield mount
    subprocess.run(["umount", mount], check=True)


def test_a_full_disk_during_a_snap_keeps_the_old_file_and_halts_until_space_is_free(
        small_disk, author, server, keys, host, tmp_path):
    src = str(tmp_path / "src")
    new = pattern(b"new", 2 << 20)
    replace_file(src, "etc/big/data.bin", new, 0o644)
    author.commit(["--root", src, "snap", "/etc/big/data.bin"])
    old = replace_file(host.root, "etc/big/data.bin", pattern(b"old", 256 << 10), 0o640)
    host.init(server.url, keys)
    failed = host("up", expect="failed")
    assert "cannot install /etc/big/data.bin: No space left on device" in error_line(failed)
    with open(old, "rb") as f:
        assert f.read() == pattern(b"old", 256 << 10) and os.stat(old).st_mode & 0o7777 == 0o640
    assert os.listdir(small_disk) == ["data.bin"]  # no temporary file left
    assert host.status()["failed"]["seq"] == 1
    subprocess.run(["mount", "-o", "remount,size=8m", small_disk], check=True)
    host("up", expect="ok")
    with open(old, "rb") as f:
        assert f.read() == new and os.stat(old).st_mode & 0o7777 == 0o644
