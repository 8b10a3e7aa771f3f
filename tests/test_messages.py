"""Messages that point the right way, and periodic runs that stay quiet when nothing is wrong: the advice at a
reboot entry on a --root, a branch that does not exist, a migrate or a fork that does not extend the host, the
cron line and the periodic unit, --splay on a terminal, the metrics after disable, enable and skip, a second
disable, and the smaller ones (log -n, plurals, expiry, sign, serve)."""

import fcntl
import json
import os
import pty
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import EXIT, ISCONF, KILL_AGENT, METRICS, Author, error_line, metric, run_isconf, undated


# --- item 5: the advice at a reboot entry depends on the root -----------------------------------

def test_at_a_reboot_entry_on_a_root_the_advice_names_reboot_command_and_the_miniroot(author, server, keys, host):
    author.commit(["reboot"])
    host.init(server.url, keys)  # the default reboot command: it would reboot the machine running isconf
    proc = host("up", expect="reboot")
    assert "isconf: transaction 1 is a reboot: %s is not the machine running isconf" % host.root in proc.out
    assert "--reboot-command" in proc.out and "Building a target disk from a miniroot" in proc.out
    assert "run 'isconf up -r'" not in proc.out
    text = host("status").out
    assert "state:        waiting for a reboot: %s is not the machine" % host.root in text
    assert "reboot:       seq 1 is a reboot: %s is not the machine" % host.root in text
    assert "run 'isconf up -r'" not in text


def test_at_a_reboot_entry_on_a_root_with_its_own_reboot_command_up_r_is_the_advice(author, server, keys, host):
    author.commit(["reboot"])
    host.init(server.url, keys, "--reboot-command", "/bin/true")
    proc = host("up", expect="reboot")
    assert ("transaction 1 is a reboot: run 'isconf --root %s up -r' to record it and run the reboot command "
            "(/bin/true)" % host.root) in proc.out


def test_at_a_reboot_entry_on_the_machine_itself_up_r_is_the_advice(isconf):
    # The agent cannot be run at / here (it would be this machine's host state): the one function that says it.
    assert isconf.reboot_advice("/", isconf.DEFAULT_REBOOT) == "run 'isconf up -r' to record it and reboot"
    assert "--reboot-command" in isconf.reboot_advice("/mnt/target", isconf.DEFAULT_REBOOT)


# --- item 6: quiet when nothing is wrong -------------------------------------------------------

def test_the_periodic_unit_counts_a_waiting_reboot_busy_and_disabled_as_success(systemd_root):
    host = systemd_root
    host("install", "--timer", expect="ok")
    with open(host.path("/etc/systemd/system/isconf-update.service")) as f:
        unit = f.read()
    assert "\nSuccessExitStatus=5 6 9\n" in unit
    assert "\nExecStart=/usr/local/sbin/isconf up --periodic\n" in unit


def quick_machine_id(isconf, seconds, seed):
    """A machine-id whose share of --splay SECONDS is under half a second: the cron line runs as written."""
    rng = random.Random(seed)
    while True:
        candidate = "%032x" % rng.getrandbits(128)
        if isconf.splay_delay(candidate.encode(), seconds) < 0.5:
            return candidate


@pytest.fixture
def cron(isconf, author, server, keys, host, busybox_root, seed):
    """The command of the cron line 'install --cron' writes, run by /bin/sh as cron runs it, the agent in it
    this file at this host's root; and the datagrams the host's syslog received."""
    busybox_root(host.root)
    os.makedirs(host.path(os.path.dirname(METRICS)))
    host.init(server.url, keys, "--metrics", METRICS, "--retries", "1", "--timeout", "5")
    host("install", "--cron", expect="ok")
    with open(host.path("/etc/cron.d/isconf")) as f:
        line, = [l for l in f if l.startswith("*/30 ")]
    command = line.split(" root ", 1)[1].strip()
    assert command.startswith("/usr/local/sbin/isconf up ")
    with open(host.path("/etc/machine-id"), "w") as f:
        f.write(quick_machine_id(isconf, 1500, seed) + "\n")
    os.makedirs(host.path("/dev"), exist_ok=True)
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(host.path("/dev/log"))
    log.setblocking(False)
    agent = "%s -I %s --root %s" % (sys.executable, ISCONF, host.root)

    def run():
        proc = subprocess.run(["/bin/sh", "-c", command.replace("/usr/local/sbin/isconf", agent, 1)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"}, timeout=120)
        said = []
        while True:
            try:
                said.append(log.recv(65536).decode("utf-8", "replace"))
            except BlockingIOError:
                break
        proc.syslog = "\n".join(said)
        return proc
    yield run
    log.close()


def test_the_cron_line_mails_nothing_for_a_waiting_reboot_a_busy_or_a_disabled_host(author, host, cron):
    author.commit(["reboot"])
    proc = cron()
    assert (proc.returncode, proc.stdout, proc.stderr) == (EXIT["reboot"], b"", b"")
    assert "transaction 1 is a reboot" in proc.syslog
    report = host.status()  # the waiting reboot is still shown: a state, not hidden
    assert report["state"] == "reboot" and report["last_run"]["exit_code"] == EXIT["reboot"]
    assert metric(host, "isconf_state", state="reboot") == 1 and metric(host, "isconf_last_run_exit_code") == 5

    with open(host.state("lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        proc = cron()
    assert (proc.returncode, proc.stderr) == (EXIT["busy"], b"")
    assert "busy" in proc.syslog and metric(host, "isconf_last_run_exit_code") == EXIT["busy"]

    host("disable", "-m", "disk swap", expect="ok")
    proc = cron()
    assert (proc.returncode, proc.stderr) == (EXIT["disabled"], b"")
    assert "disabled by" in proc.syslog and "disk swap" in proc.syslog
    assert metric(host, "isconf_last_run_exit_code") == EXIT["disabled"]


def test_the_cron_line_still_mails_what_is_wrong(server, host, cron):
    server.stop()
    proc = cron()
    assert proc.returncode == EXIT["unreachable"]
    assert "isconf: error: no mirror could be reached" in undated(proc.stderr.decode())


def test_without_periodic_a_disabled_or_busy_host_is_an_error_on_stderr(author, monitored):
    host = monitored
    host("disable", "-m", "disk swap", expect="ok")
    assert "disabled by" in error_line(host("up", expect="disabled"))
    proc = host("up", "--periodic", expect="disabled")
    assert proc.err == "" and "isconf: this host was disabled by" in proc.out


def test_splay_says_how_long_it_waits_on_a_terminal_only(author, monitored):
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-I", ISCONF, "--root", host.root, "up", "--splay", "0.3"],
                              stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                              env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"}, timeout=60)
        os.close(slave)
        slave = None
        said = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            said += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    text = said.decode()
    assert text.count("--splay: waiting") == 1, text
    assert "s before this run: this host's share of 0.3 s, so that a fleet started at once" in text
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    proc = host("up", "--splay", "0.3", expect="ok")  # off a terminal: not a word of it
    assert "splay" not in proc.err and "splay" not in proc.out


def test_disable_enable_and_skip_rewrite_the_metrics(author, monitored, busybox_root):
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/false"], ["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="failed")
    assert metric(host, "isconf_failed_seq") == 1 and metric(host, "isconf_disabled") == 0
    host("disable", "-m", "disk swap", expect="ok")
    assert metric(host, "isconf_disabled") == 1 and metric(host, "isconf_state", state="disabled") == 1
    host("enable", expect="ok")
    assert metric(host, "isconf_disabled") == 0 and metric(host, "isconf_state", state="failed") == 1
    host("skip", "1", "-m", "not on this host", expect="ok")
    assert metric(host, "isconf_failed_seq") == 0 and metric(host, "isconf_applied_seq") == 1
    assert metric(host, "isconf_state", state="pending") == 1


def test_init_help_of_metrics_names_every_verb_that_writes_them():
    text = " ".join(run_isconf("init", "--help", expect="ok").out.split())
    assert "--metrics PATH after every 'up' and each disable, enable, skip and verify, write a Prometheus" in text, text


def test_a_second_disable_refuses_without_force_and_with_it_keeps_both_reasons(monitored):
    host = monitored
    host("disable", "-m", "disk swap, ticket 1", expect="ok", env={"ISCONF_AUTHOR": "alice@admin1"})
    proc = host("disable", "-m", "kernel test", expect="disabled", env={"ISCONF_AUTHOR": "bob@admin2"})
    line = error_line(proc)
    assert "this host is already disabled by alice@admin1 at " in line and "disk swap, ticket 1" in line
    assert "'isconf disable --force -m WHY' adds your reason" in line
    assert host.status()["disabled"]["why"] == "disk swap, ticket 1"  # untouched
    host("disable", "--force", "-m", "kernel test", expect="ok", env={"ISCONF_AUTHOR": "bob@admin2"})
    report = host.status()["disabled"]
    assert (report["who"], report["why"]) == ("bob@admin2", "kernel test")
    assert [(e["who"], e["why"]) for e in report["earlier"]] == [("alice@admin1", "disk swap, ticket 1")]
    text = host("status").out
    assert "DISABLED:     by bob@admin2 at " in text and ": kernel test ('isconf enable' lifts it)" in text
    assert "              and before, by alice@admin1 at " in text and ": disk swap, ticket 1" in text
    line = error_line(host("up", expect="disabled"))
    assert "kernel test; and before, by alice@admin1 at " in line
    proc = host("enable", expect="ok")
    assert "kernel test; and before, by alice@admin1" in proc.out



def test_disable_reasons_stay_bounded_and_enable_lifts_even_a_damaged_pause(monitored):
    host = monitored
    proc = host("disable", "-m", "x" * 5000, expect="usage")   # a record that must stay one small record
    assert "-m WHY is 5000 characters; say it in at most 4096" in error_line(proc)
    assert host("skip", "1", "-m", "x" * 5000, expect="usage").returncode == 2
    host("disable", "-m", "first", expect="ok")
    for n in range(20):
        host("disable", "--force", "-m", "reason %d" % n, expect="ok")
    report = host.status()["disabled"]
    assert report["why"] == "reason 19" and len(report["earlier"]) == 16   # the latest kept, the oldest let go
    assert report["earlier"][-1]["why"] == "reason 18" and report["earlier"][0]["why"] == "reason 3"
    with open(host.path("/var/lib/isconf/disabled"), "wb") as f:
        f.write(b"x" * (2 << 20))   # past any record's bound: unreadable, and still a pause
    host("up", expect="state")
    proc = host("enable", expect="ok")
    assert "removing it" in proc.err and not os.path.exists(host.path("/var/lib/isconf/disabled"))


# --- item 7: a branch that does not exist, a migrate or a fork that does not extend the host ------

def test_a_branch_no_mirror_has_is_refused_at_once_naming_the_mirror(author, server, host):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, "--branch", "wbe", "--insecure", "--retries", "3", expect="ok")
    before = server.mark()
    proc = host("up", expect="refused")
    assert error_line(proc) == ("isconf: error: branch wbe does not exist on %s; check the branch name (and the "
                                "mirror URLs)" % server.url)
    assert "warning: mirror" not in proc.err  # the error names it: no second word about it
    assert server.mark() - before == 1  # the head, once: a wrong name is not asked for again
    report = host.status()
    assert report["state"] == "refused" and "branch wbe does not exist" in report["last_run"]["reason"]


def test_at_boot_a_branch_no_mirror_has_is_waited_for_then_refused(author, server, host):
    # At boot a repository may still be on its way to a mirror: the boot wait runs out first.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, "--branch", "wbe", "--insecure", "--boot-wait", "1", expect="ok")
    proc = host("up", "--boot", expect="refused")
    assert "waiting up to 1 s for a mirror" in proc.err
    assert error_line(proc).startswith("isconf: error: branch wbe does not exist on %s; " % server.url)


def test_a_directory_mirror_says_which_branches_it_has(author, server, host):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    Author(author.repo, branch="db", keys=author.keys).commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, author.repo, "--branch", "wbe", "--insecure", expect="ok")
    line = error_line(host("up", expect="refused"))
    assert line == ("isconf: error: branch wbe does not exist on %s, %s (branches there: db, web); check the "
                    "branch name (and the mirror URLs)" % (server.url, author.repo))
    proc = host("migrate", "dbx", expect="refused")
    assert "branch dbx does not exist on %s, %s (branches there: db, web)" % (server.url, author.repo) \
        in error_line(proc)


def test_a_directory_mirror_names_few_branches_and_only_branch_names(author, host):
    # A share holding thousands of directories, or names with control characters, makes no book of an error line.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    for name in ["b%02d" % n for n in range(30)] + ["evil\nname", "\x1b[2J"]:
        os.makedirs(os.path.join(author.repo, "branches", name))
        open(os.path.join(author.repo, "branches", name, "head"), "w").close()
    host("init", author.repo, "--branch", "wbe", "--insecure", expect="ok")
    line = error_line(host("up", expect="refused"))
    shown = re.search(r"\(branches there: (.*?)\);", line).group(1).split(", ")
    assert shown == ["b%02d" % n for n in range(20)] + ["..."], line   # "web" sorts after b29: not reached
    assert "evil" not in line and "[2J" not in line


def test_a_mirror_that_does_not_answer_is_still_unreachable_beside_one_without_the_branch(author, server, host):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    empty = os.path.join(os.path.dirname(host.root), "not-mounted-yet")
    os.makedirs(empty)  # a share not mounted yet: no repository there, so no word on branches
    host("init", server.url, empty, "--branch", "wbe", "--insecure", "--retries", "1", expect="ok")
    proc = host("up", expect="unreachable")
    assert "no mirror could be reached" in error_line(proc) and "Traceback" not in proc.err


@pytest.fixture
def two_applied(author, server, keys, host, busybox_root):
    """A host that applied branch web's two entries; branch short forked from web after the first."""
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    author("fork", "short", "--sign", keys.private)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys)
    host("up", expect="ok")
    return host


def test_migrate_to_a_branch_that_ends_before_the_host_says_so(two_applied, server):
    line = error_line(two_applied("migrate", "short", expect="refused"))
    assert ("branch short from %s does not extend this host's history: it ends at seq 1, before the 2 this host "
            "applied" % server.url) in line
    assert "rollback" not in line and "stale" not in line


def test_migrate_to_a_branch_that_diverges_says_where(two_applied, author, server, keys):
    other = Author(author.repo, branch="other", keys=keys)
    other.commit(["exec", "--no-run", "--", "/bin/true"], ["exec", "--no-run", "--", "/bin/false"],
                 ["exec", "--no-run", "--", "/bin/true"])
    line = error_line(two_applied("migrate", "other", expect="refused"))
    assert "branch other from %s does not extend this host's history (diverges at seq 1)" % server.url in line


def test_a_branch_rewritten_past_the_host_says_the_journals_diverge(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    kept = os.path.join(os.path.dirname(author.repo), "web-at-1")
    shutil.copytree(author.path(), kept)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys)
    host("up", expect="ok")
    # The branch put back at seq 1 and carried on otherwise: a fork where the host's copy was.
    shutil.rmtree(author.path())
    author.forget_seen_head()
    shutil.copytree(kept, author.path())
    author.commit(["exec", "--no-run", "--", "/bin/echo", "another second entry, longer than the first"],
                  ["exec", "--no-run", "--", "/bin/true"])
    line = error_line(host("up", expect="refused"))
    assert ("journal of branch web from %s diverges from this host's copy at seq 2: the branch was forked or "
            "rewritten after this host verified it (seq 2)" % server.url) in line
    assert "not valid JSON" not in line


# --- item 7, the smaller ones --------------------------------------------------------------------

def test_log_n_refuses_a_negative_count(author, monitored):
    author.commit(["exec", "--no-run", "--", "/bin/true"], ["exec", "--no-run", "--", "/bin/true"])
    monitored("up", expect="ok")
    proc = monitored("log", "-n", "-1", expect="usage")
    assert error_line(proc) == "isconf: error: -n -1: give the number of newest entries to show, 0 or more"
    assert json.loads(monitored("log", "-n", "1", "--json", expect="ok").out)[0]["seq"] == 2
    assert monitored("log", "-n", "0", expect="ok").out == ""


def test_one_interrupted_attempt_is_said_as_one_time(author, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", KILL_AGENT])
    host.init(author.repo, author.keys, "--interrupted-max", "1")
    assert host("up").returncode == -9
    line = error_line(host("up", expect="failed"))
    assert "started 1 time without ending (interrupted_max 1)" in line


def test_a_new_head_without_expiry_says_the_last_one_expires_or_expired(author, keys):
    author("lock", "-m", "first")
    author("exec", "--no-run", "--", "/bin/true")
    author.ci("--expires", "30d")
    head = json.load(open(author.path("head")))
    proc = author("sign", "--sign", keys.private)
    assert "isconf: warning: the last head expires at %s; this one never expires" % head["expires"] in proc.err
    author("sign", "--sign", keys.private, "--expires", "1s")
    head = json.load(open(author.path("head")))
    time.sleep(2)  # past it: not a timing assertion, only a head that has expired
    proc = author("sign", "--sign", keys.private)
    assert "isconf: warning: the last head expired at %s; this one never expires" % head["expires"] in proc.err


def test_an_expired_head_tells_the_host_that_its_authors_renew_it(author, keys, server, host):
    # The common cause is a quiet branch nobody renewed, not a frozen mirror: the line names the renewal.
    author("lock", "-m", "first")
    author("exec", "--no-run", "--", "/bin/true")
    author.ci("--expires", "1d")
    host.init(server.url, keys)
    line = error_line(host("up", "--now", "2099-01-01T00:00:00Z", expect="refused"))
    assert "head of branch web expired at" in line and "its authors renew it with 'isconf sign --expires" in line, line


def test_sign_without_a_key_does_not_offer_an_unsigned_it_lacks(author):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    line = error_line(author("sign", expect="usage"))
    assert "sign needs a signing key: --sign KEY or ISCONF_SIGN_KEY" in line and "--unsigned" not in line
    author("lock", "-m", "more")
    author("exec", "--no-run", "--", "/bin/true")
    line = error_line(author("ci", expect="usage"))
    assert "--unsigned publishes one for --insecure hosts only" in line


def serve(directory):
    proc = subprocess.Popen([sys.executable, "-I", ISCONF, "serve", directory, "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    started = proc.stderr.readline()
    url = re.search(rb"on (http://\S+)", started).group(1).decode()
    with pytest.raises(urllib.error.HTTPError):  # it answers: serving, past its start
        urllib.request.urlopen(url + "branches/none/head", timeout=20)
    return proc, started


def test_serve_stops_cleanly_on_ctrl_c(author):
    proc, _ = serve(author.repo)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read().decode()
    assert proc.wait(20) == 128 + signal.SIGINT
    assert undated(rest).splitlines()[-1] == "isconf: stopped serving %s (SIGINT)" % author.repo
    assert "carry on" not in rest
    proc.stderr.close()


@pytest.mark.parametrize("holds", [False, True])
def test_serve_warns_once_of_a_directory_that_holds_no_repository(author, tmp_path, holds):
    directory = author.repo if holds else str(tmp_path / "empty")
    os.makedirs(directory, exist_ok=True)
    proc, started = serve(directory)
    proc.send_signal(signal.SIGTERM)
    said = undated((started + proc.stderr.read()).decode())
    proc.wait(20)
    proc.stderr.close()
    warning = ("isconf: warning: %s holds no repository (no isconf-repo, no branches/NAME/head): every request "
               "will be answered 404" % directory)
    assert said.count(warning) == (0 if holds else 1), said
