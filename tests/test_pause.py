"""Baselines, waiting for the host lock, who holds it, and pausing a host with disable/enable."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ISCONF, error_line

DISABLED = 9  # README's exit code for 'up' on a disabled host


def three_touches(author):
    author.commit(*[["exec", "--no-run", "--", "/bin/touch", "/tmp/t%d" % n] for n in (1, 2, 3)])


def touched(host):
    return [n for n in (1, 2, 3) if os.path.exists(host.path("/tmp/t%d" % n))]


def history(host):
    with open(host.state("history")) as f:
        return [json.loads(line) for line in f]


# --- Baseline --------------------------------------------------------------------------------------------------

def test_a_baseline_host_applies_only_what_follows_its_baseline(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys, "--baseline", "2")
    host("up", expect="ok")
    assert touched(host) == [3]
    baseline = [e for e in history(host) if e["event"] == "baseline"]
    assert [e["seq"] for e in baseline] == [1 + 1] and len(baseline[0]["id"]) == 64


def test_status_and_log_say_a_host_stands_on_a_baseline(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys, "--baseline", "2")
    assert host.status()["baseline"] == {"seq": 2, "id": None}  # declared, not yet checked
    host("up", expect="ok")
    report = host.status()
    assert report["applied_seq"] == 3 and report["pending"] == 0
    states = {e["seq"]: (e["state"], e["id"]) for e in json.loads(host("log", "--json", expect="ok").out)}
    assert {seq: state for seq, (state, _) in states.items()} == {1: "baseline", 2: "baseline", 3: "applied"}
    assert report["baseline"] == {"seq": 2, "id": states[2][1]}
    assert "baseline:     seq 2  %s" % states[2][1][:16] in host("status", expect="ok").out
    assert host("log", expect="ok").out.count("baseline") == 2


def test_a_journal_shorter_than_the_baseline_is_refused_and_nothing_applies(author, server, keys, host,
                                                                            busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys, "--baseline", "5")
    line = error_line(host("up", expect="refused"))
    assert "ends at seq 3, before this host's baseline seq 5" in line, line
    assert touched(host) == [] and host.status()["applied_seq"] == 0
    host("init", "--force", server.url, "--branch", "web", "--signers", keys.signers, "--baseline", "3",
         expect="ok")
    host("up", expect="ok")
    assert touched(host) == [] and host.status()["applied_seq"] == 3


def test_a_dry_run_shows_only_what_follows_the_baseline_and_ties_nothing(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys, "--baseline", "2")
    out = host("up", "--dry-run", expect="pending").out
    assert "would apply 3 " in out and "would apply 2 " not in out
    assert not os.path.exists(host.state("history"))  # not even the baseline's tie to its entry


def test_init_force_keeps_the_baseline_and_will_not_change_a_verified_one(author, server, keys, host,
                                                                         busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys, "--baseline", "2")
    host("up", expect="ok")
    host("init", "--force", server.url, "--branch", "web", "--signers", keys.signers, expect="ok")
    assert host.status()["baseline"]["seq"] == 2
    line = error_line(host("init", "--force", server.url, "--branch", "web", "--signers", keys.signers,
                           "--baseline", "1", expect="usage"))
    assert "baseline is seq 2" in line, line
    assert host.status()["baseline"]["seq"] == 2


def test_a_host_that_applied_transactions_cannot_claim_a_baseline(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys)
    host("up", expect="ok")
    line = error_line(host("init", "--force", server.url, "--branch", "web", "--signers", keys.signers,
                           "--baseline", "3", expect="usage"))
    assert "applied through seq 3 already" in line, line
    assert host.status()["baseline"] is None


def test_a_baseline_host_migrates_only_to_a_branch_that_extends_its_baseline(author, server, keys, host,
                                                                            busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/t1"], ["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys, "--baseline", "2")
    host("up", expect="ok")
    other = type(author)(author.repo, branch="other", keys=keys)
    other.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/t2"], ["exec", "--no-run", "--", "/bin/true"],
                 ["exec", "--no-run", "--", "/bin/touch", "/tmp/t3"])
    line = error_line(host("migrate", "other", expect="refused"))
    assert "branch other from %s does not extend this host's history (diverges at seq 1)" % server.url in line, line
    author("fork", "canary", "--sign", keys.private)
    canary = type(author)(author.repo, branch="canary", keys=keys)
    canary.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/t3"])
    host("migrate", "canary", expect="ok")
    host("up", expect="ok")
    assert touched(host) == [3]


@pytest.mark.parametrize("seq", ["0", "-1", "x"])
def test_a_baseline_that_is_not_a_seq_is_a_usage_error(author, keys, host, seq):
    proc = host("init", author.repo, "--branch", "web", "--signers", keys.signers, "--baseline", seq,
                expect="usage")
    assert "--baseline" in error_line(proc)


# --- The host lock: who holds it, and waiting for it ------------------------------------------------------------

class RunningUp(object):
    """An 'up' held inside a transaction until release(): it holds the host lock meanwhile."""

    def __init__(self, author, host):
        self.host = host
        author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                       "touch /tmp/started; while ! test -e /tmp/go; do sleep 1; done; touch /tmp/held"])
        self.proc = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
        deadline = time.time() + 60
        while not os.path.exists(host.path("/tmp/started")):
            assert self.proc.poll() is None and time.time() < deadline, self.proc.communicate()
            time.sleep(0.05)

    def release(self):
        open(self.host.path("/tmp/go"), "w").close()
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return out


@pytest.fixture
def running_up(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    run = RunningUp(author, host)
    yield run
    if run.proc.poll() is None:
        open(host.path("/tmp/go"), "w").close()
        run.proc.communicate(timeout=60)


def test_the_busy_message_names_the_holders_pid_and_start_time(running_up, host):
    line = error_line(host("up", expect="busy"))
    assert "locked by pid %d since 20" % running_up.proc.pid in line, line
    running_up.release()
    with open(host.state("lock")) as f:
        assert f.read() == ""  # no stale holder once it is released


def test_up_wait_waits_for_the_running_up_then_runs(running_up, host, author):
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    waiting = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up", "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    # It says once that it waits, and on whom; then the running up is let go.
    line = waiting.stderr.readline().decode()
    assert "waiting for this host's lock, held by pid %d" % running_up.proc.pid in line, line
    running_up.release()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert os.path.exists(host.path("/tmp/held")) and os.path.exists(host.path("/tmp/after"))


def test_up_wait_with_seconds_gives_up_busy_when_they_pass(running_up, host):
    line = error_line(host("up", "--wait", "1", expect="busy"))
    assert "locked by pid %d" % running_up.proc.pid in line and "after waiting 1 s" in line, line


@pytest.mark.parametrize("seconds", ["0", "-3", "soon", "nan"])
def test_up_wait_takes_positive_seconds(host, seconds):
    assert "--wait" in error_line(host("up", "--wait", seconds, expect="usage"))


# --- disable and enable ---------------------------------------------------------------------------------------

def test_a_disabled_host_applies_nothing_and_says_who_when_and_why(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    three_touches(author)
    host.init(server.url, keys)
    host("disable", "-m", "disk swap, ticket 42", expect="ok")
    proc = host("up")
    assert proc.returncode == DISABLED, proc.err
    line = error_line(proc)
    assert "disabled by alice@example at 20" in line and "disk swap, ticket 42" in line, line
    assert touched(host) == []
    host("enable", expect="ok")
    host("up", expect="ok")
    assert touched(host) == [1, 2, 3]


def test_status_shows_a_disabled_host_until_it_is_enabled(author, keys, host):
    host.init(author.repo, keys)
    host("disable", "-m", "kernel upgrade by hand", expect="ok")
    disabled = host.status()["disabled"]
    assert disabled["who"] == "alice@example" and disabled["why"] == "kernel upgrade by hand"
    assert disabled["time"].startswith("20")
    text = host("status", expect="ok").out
    assert "DISABLED:     by alice@example at %s: kernel upgrade by hand" % disabled["time"] in text, text
    host("enable", expect="ok")
    assert host.status()["disabled"] is None
    assert "DISABLED" not in host("status", expect="ok").out
    assert "was not disabled" in host("enable", expect="ok").out


def test_disable_and_enable_wait_their_turn_behind_a_running_up(running_up, host):
    assert "this host is busy" in error_line(host("disable", "-m", "now", expect="busy"))
    assert not os.path.exists(host.state("disabled"))
    running_up.release()
    host("disable", "-m", "now", expect="ok")
    assert host.status()["disabled"]["why"] == "now"


def test_disable_needs_a_reason(author, keys, host):
    host.init(author.repo, keys)
    assert "reason" in error_line(host("disable", "-m", "  ", expect="usage"))
    assert host.status()["disabled"] is None


def test_help_lists_the_disabled_exit_code(host):
    assert "9 disabled" in host("--help", expect="ok").out
