"""Transactions that run commands: when they end, time limits, Ctrl-C, and bugs told apart from failures."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, error_line, pid_alive, undated, wait_gone


def with_dev_null(root):
    """A shell backgrounds a job with stdin from /dev/null: the chroot needs one."""
    os.makedirs(os.path.join(root, "dev"), exist_ok=True)
    os.mknod(os.path.join(root, "dev/null"), 0o666 | 0o020000, os.makedev(1, 3))


def read_pid(host, path):
    with open(host.path(path)) as f:
        return int(f.read())


def test_an_exec_ends_when_its_command_ends_though_a_daemon_holds_its_output(author, server, keys, host,
                                                                              busybox_root, daemons):
    # An init script that starts a daemon: the daemon inherits stdout and keeps it open for 60 s.
    busybox_root(host.root)
    with_dev_null(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "sleep 60 & echo $! > /tmp/daemon; echo started"],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    host.init(server.url, keys)
    up = host("up", expect="ok", timeout=45)
    daemons.append(read_pid(host, "/tmp/daemon"))
    assert "started" in up.out and os.path.exists(host.path("/tmp/after"))
    assert pid_alive(daemons[0])  # the daemon keeps running
    host("up", expect="ok", timeout=45)  # and the host lock was let go


def test_exec_timeout_kills_the_whole_process_group_and_fails_naming_the_limit(author, server, keys, host,
                                                                               busybox_root, daemons):
    busybox_root(host.root)
    with_dev_null(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "sleep 60 & echo $! > /tmp/child; sleep 60"])
    host.init(server.url, keys, "--exec-timeout", "1")
    assert "exec_timeout = 1" in open(host.path("/etc/isconf/isconf.conf")).read()
    failed = host("up", expect="failed", timeout=45)
    daemons.append(read_pid(host, "/tmp/child"))
    assert "killed after running for exec_timeout 1 s" in error_line(failed)
    assert wait_gone(daemons[0])
    assert "exec_timeout" in "\n".join(host.status()["failed"]["log_tail"])


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_bad_exec_timeout_is_refused(host, value):
    proc = host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", "--exec-timeout", value)
    assert proc.returncode == 2 and "exec" in error_line(proc)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stopped_run_stops_its_command_and_leaves_the_transaction_to_run_again(signum, code, author, server, keys,
                                                                                 host, busybox_root, daemons):
    # Ctrl-C, cron under timeout(1), a dropped ssh session: the command must not outlive the run and its lock.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "test -e /tmp/again && exit 0; touch /tmp/again; echo $$ > /tmp/pid; sleep 60"])
    host.init(server.url, keys)
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not os.path.exists(host.path("/tmp/pid")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the shell wrote its pid and is in sleep
    daemons.append(read_pid(host, "/tmp/pid"))
    agent.send_signal(signum)
    assert agent.wait(30) == code
    err = undated(agent.stderr.read().decode())
    agent.stderr.close()
    assert [l for l in err.splitlines() if l.strip()] == [
        "isconf: interrupted by %s; nothing is left half-recorded: run the command again to carry on"
        % signal.Signals(signum).name]
    assert wait_gone(daemons[0])
    events = [json.loads(l) for l in open(host.state("history"))]
    assert [(e["event"], e.get("signal")) for e in events] == [("started", None),
                                                               ("interrupted", signal.Signals(signum).name)]
    host("up", expect="ok")  # interrupted means run again
    assert host.status()["applied_seq"] == 1


@pytest.mark.parametrize("args", [["up"], ["status"], ["log", "--json"], ["--version"]])
def test_output_to_a_full_disk_is_dropped_and_the_run_goes_on(args, author, server, keys, host, busybox_root):
    # A cron job appending to a log on a full /var must still apply the journal, with its own exit code.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo lots of output; touch /tmp/done"])
    host.init(server.url, keys)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-I", ISCONF, "--root", host.root] + args, stdout=full,
                              stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b""
    if args == ["up"]:
        assert os.path.exists(host.path("/tmp/done"))


BUGGY = """
import sys
sys.path.insert(0, sys.argv[1])
import isconf
def bug(args):
    raise ZeroDivisionError("a bug in the agent")
isconf.cmd_status = bug
sys.exit(isconf.main(sys.argv[2:]))
"""


def run_with_a_bug(*args):
    return subprocess.run([sys.executable, "-I", "-c", BUGGY, os.path.dirname(ISCONF)] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


def test_a_bug_is_exit_70_with_one_line_and_the_traceback_kept(host):
    host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    proc = run_with_a_bug("--root", host.root, "status")
    err = undated(proc.stderr.decode())
    assert proc.returncode == 70 and len(err.strip().splitlines()) == 1
    assert err.startswith("isconf: internal error: ZeroDivisionError: a bug in the agent")
    assert host.state("internal-error.log") in err
    with open(host.state("internal-error.log")) as f:
        assert "Traceback" in f.read()


def test_debug_shows_the_traceback_of_a_bug(host):
    host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    proc = run_with_a_bug("--root", host.root, "status", "--debug")
    assert proc.returncode == 70 and b"Traceback" in proc.stderr and b"ZeroDivisionError" in proc.stderr


@pytest.mark.parametrize("name,content,fragment", [
    ("publishing", b"{not json", "publication record"),
    ("publishing", b'{"head": 5, "sig": null}\n', "publication record"),
    ("staged", b'[1, 2]\n', "staged work"),
    ("lock", b'["alice"]\n', "lock"),
    ("staged", b'{"kind": "exec", "argv": 7}\n', "not staged under this lock"),  # without its MAC: refused
])
def test_a_damaged_authoring_record_is_a_clear_error(author, name, content, fragment):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("reboot")
    with open(os.path.join(author.repo, "authoring", "web", name), "wb") as f:
        f.write(content)
    assert fragment in error_line(author.ci(expect="refused" if "MAC" in fragment or "under" in fragment
                                            else "state"))


def test_journal_text_is_printed_with_control_characters_escaped(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "-m", "clear\x1b[2Jscreen", "--", "/bin/sh", "-c", "exit 3 #\x1b]0;pwned\x07\nx"])
    host.init(server.url, keys)
    up = host("up", expect="failed")
    assert "\x1b" not in up.out + up.err and "\x07" not in up.out + up.err
    assert "\\x1b]0;pwned\\x07\\x0ax" in error_line(up)  # and the error stays one line
    for verb in ("status", "log"):
        out = host(verb).out
        assert "\x1b" not in out and "\\x1b" in out
