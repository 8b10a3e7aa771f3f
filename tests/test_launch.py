"""How a run starts its commands inside a --root: one process, set up once for the run (chroot, mount
namespace, umask), starts each with posix_spawn; it is made again when what it set up would differ."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, error_line, mounts_under, pid_alive

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_spawn"), reason="Python 3.6 and 3.7 start each command alone")

BUSYBOX = "/bin/busybox"


def up(target):
    """isconf up as a process of its own: (its pid, exit status, output)."""
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", target.root, "up"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out = agent.communicate(timeout=120)[0].decode()
    return agent.pid, agent.returncode, out


def test_a_runs_commands_are_started_by_one_process_the_agent_made_once(author, server, keys, target):
    # Each command notes its parent and its parent's parent (field 4 of /proc/PID/stat).
    note = 'echo "$PPID $(%s cut -d" " -f4 /proc/$PPID/stat)" >> /tmp/parents' % BUSYBOX
    for _ in range(3):
        author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", note])
    target.init(server.url, keys)
    pid, code, out = up(target)
    assert code == 0, out
    parents = [tuple(int(n) for n in line.split()) for line in open(target.path("/tmp/parents"))]
    assert len(parents) == 3 and len(set(parents)) == 1, parents
    assert parents[0][0] != pid and parents[0][1] == pid, (parents, pid)
    assert mounts_under(target.root) == []


def test_what_one_command_mounts_or_unmounts_never_reaches_the_next(author, server, keys, target):
    # Each command gets a copy of the run's namespace: the same journal makes the same disk in one run or
    # in several (a failure and its retry, a reboot entry, a re-exec).
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "%s mount -t tmpfs run-scratch /mnt && echo in-the-tmpfs > /mnt/f && %s umount /proc"
                   % (BUSYBOX, BUSYBOX)])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "echo on-the-disk >> /mnt/f; test -r /proc/self/status && echo seen > /tmp/seen"])
    target.init(server.url, keys)
    target("up", expect="ok")
    assert open(target.path("/mnt/f")).read() == "on-the-disk\n"
    assert open(target.path("/tmp/seen")).read() == "seen\n"
    assert mounts_under(target.root) == []


def test_a_proc_a_transaction_replaces_is_mounted_again_for_the_next(author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "%s umount /proc && rmdir /proc && mkdir /proc" % BUSYBOX])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -r /proc/self/status && echo seen > /tmp/seen"])
    target.init(server.url, keys)
    target("up", expect="ok")
    assert open(target.path("/tmp/seen")).read() == "seen\n"
    assert mounts_under(target.root) == []


def test_a_root_that_gains_its_proc_mid_run_has_it_mounted_for_the_later_commands(author, server, keys, host,
                                                                                   busybox_root):
    busybox_root(host.root)  # no /proc, /sys, /dev, /run: the first command makes /proc, as an unpacked base would
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /proc/self || mkdir /proc"])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -r /proc/self/status && echo seen > /tmp/seen"])
    host.init(server.url, keys)
    host("up", expect="ok")
    assert open(host.path("/tmp/seen")).read() == "seen\n"
    assert mounts_under(host.root) == [] and os.listdir(host.path("/proc")) == []


def test_a_command_that_kills_what_started_it_fails_its_transaction_and_the_next_run_carries_on(
        author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "test -e /tmp/once || { touch /tmp/once; kill -9 $PPID; sleep 1; }; echo ran >> /tmp/ran"])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo second > /tmp/second"])
    target.init(server.url, keys)
    proc = target("up", expect="failed")
    assert "the process that starts commands in the root has ended" in error_line(proc), proc.err
    assert not os.path.exists(target.path("/tmp/second"))
    target("up", expect="ok")
    assert open(target.path("/tmp/second")).read() == "second\n"
    assert mounts_under(target.root) == []


def test_a_command_is_looked_up_in_its_path_and_one_the_root_lacks_fails_with_the_reason(
        author, server, keys, target):
    author.commit(["exec", "--no-run", "--", "sh", "-c", "echo found > /tmp/found"])
    author.commit(["exec", "--no-run", "--", "no-such-command", "x"])
    target.init(server.url, keys)
    proc = target("up", expect="failed")
    assert open(target.path("/tmp/found")).read() == "found\n"
    assert "cannot start no-such-command" in error_line(proc) and "No such file" in error_line(proc), proc.err
    author.commit(["exec", "--no-run", "--", "/tmp", "x"])
    target("skip", "2", "-m", "typo", expect="ok")
    proc = target("up", expect="failed")
    assert "cannot start /tmp" in error_line(proc) and "Permission denied" in error_line(proc), proc.err


def agent(target, wrapper):
    """isconf up started through wrapper (a command line that execs the rest)."""
    return subprocess.Popen(wrapper + [sys.executable, "-I", ISCONF, "--root", target.root, "up"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})


def test_a_command_gets_its_log_and_null_only_no_signal_blocked_or_ignored_and_the_statuses_it_exits_with(
        author, server, keys, target, tmp_path):
    # The agent is started by a parent that left descriptor 9 open, SIGCHLD ignored, where /proc is not mounted
    # (a miniroot that has not mounted it yet): none of that reaches the command, nor its exit status.
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "%s ls /proc/self/fd > /tmp/fds; %s grep -E '^Sig(Blk|Ign)' /proc/self/status > /tmp/signals; "
                   "%s yes | %s head -1 > /tmp/yes" % ((BUSYBOX,) * 4)])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "exit 3"])
    target.init(server.url, keys)
    leak = str(tmp_path / "leak")
    proc = agent(target, ["unshare", "-m", "sh", "-c", 'umount -l /proc && exec 9>%s && exec "$@"' % leak, "sh",
                          sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN);"
                          " os.execv(sys.argv[1], sys.argv[1:])"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"exited with status 3" in err, (out, err)
    assert sorted(open(target.path("/tmp/fds")).read().split()) == ["0", "1", "2", "3"]  # 3: the ls's own
    signals = dict(line.split() for line in open(target.path("/tmp/signals")))
    assert int(signals["SigBlk:"], 16) == 0 and int(signals["SigIgn:"], 16) & ~0x180000000 == 0, signals
    assert open(target.path("/tmp/yes")).read() == "y\n"


def test_an_agent_killed_without_proc_leaves_nothing_holding_the_host_lock(author, server, keys, target, daemons):
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "test -e /tmp/once || { touch /tmp/once; echo $$ > /tmp/pid; exec sleep 20; }"])
    target.init(server.url, keys)
    proc = agent(target, ["unshare", "-m", "sh", "-c", 'umount -l /proc && exec "$@"', "sh"])
    deadline = time.time() + 60
    while not os.path.exists(target.path("/tmp/pid")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    command = int(open(target.path("/tmp/pid")).read())
    daemons.append(command)
    proc.kill()
    proc.communicate()
    target("up", expect="ok")  # not busy (6) while the command sleeps on
    assert pid_alive(command)
