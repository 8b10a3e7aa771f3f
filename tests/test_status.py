"""status tells each state apart, every 'up' records its result, up --dry-run, and the metrics file."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ISCONF, METRICS, error_line, replace_file

WAIT = "touch /tmp/started; while ! test -e /tmp/go; do sleep 0.1; done"


def metrics(host):
    """The metrics file as the official client parses it: {name: value}, and isconf_info's labels."""
    with open(host.path(METRICS)) as f:
        families = list(text_string_to_metric_families(f.read()))
    values, info = {}, None
    for family in families:
        for sample in family.samples:
            if sample.name == "isconf_info":
                info = sample.labels
            elif sample.name == "isconf_state":
                if sample.value == 1:
                    values.setdefault("state", []).append(sample.labels["state"])
            else:
                values[sample.name] = sample.value
    return values, info


def status(host, code=0):
    proc = host("status", "--json")
    assert proc.returncode == code, proc.err
    report = json.loads(proc.out)
    assert report["schema"] == 1
    return report


def last_run(host):
    with open(host.state("last-run")) as f:
        return json.load(f)


def test_a_host_never_fetched_then_up_to_date_then_pending(author, monitored, keys):
    host = monitored
    assert status(host)["state"] == "never-fetched" and "never fetched" in host("status").out
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"], ["snap", "/bin/busybox"])
    host("up", expect="ok")
    report = status(host)
    assert report["state"] == "up-to-date" and report["last_success"]
    run = report["last_run"]
    assert (run["result"], run["exit_code"], run["applied"], run["reason"]) == ("ok", 0, 2, None)
    assert run["fetched_bytes"] > os.path.getsize(host.path("/bin/busybox"))  # head, journal and the object
    values, info = metrics(host)
    assert values["isconf_last_run_exit_code"] == 0 and values["isconf_applied_seq"] == 2
    assert values["isconf_pending_transactions"] == 0 and values["isconf_failed_seq"] == 0
    assert values["isconf_last_success_timestamp_seconds"] == values["isconf_last_run_timestamp_seconds"] > 0
    assert info == {"version": report["agent"], "branch": "web", "applied_id": report["applied_id"]}
    assert values["state"] == ["up-to-date"]
    # migrate verifies and keeps the new branch's journal without applying it: pending
    author("fork", "canary", "--sign", keys.private)
    author.branch = "canary"
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    host("migrate", "canary", expect="ok")
    assert (status(host)["state"], status(host)["pending"]) == ("pending", 1)


def test_a_failed_transaction_halts_and_is_the_last_runs_result(author, monitored):
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/false"])
    host("up", expect="failed")
    report = status(host, code=1)
    assert report["state"] == "failed" and report["failed"]["seq"] == 1 and report["last_success"] is None
    assert report["last_run"]["result"] == "failed" and "transaction 1 failed" in report["last_run"]["reason"]
    values, _ = metrics(host)
    assert (values["isconf_last_run_exit_code"], values["isconf_failed_seq"]) == (1, 1)
    assert values["isconf_last_success_timestamp_seconds"] == 0 and values["state"] == ["failed"]


def test_a_refused_run_is_shown_with_its_reason(author, monitored):
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    with open(author.path("head.sig"), "w") as f:
        f.write("not a signature\n")
    reason = error_line(host("up", expect="refused"))[len("isconf: error: "):]
    report = status(host)  # status itself still exits 0: the host applied what it had
    assert report["state"] == "refused" and report["last_run"]["reason"] == reason
    assert report["last_run"]["applied"] == 0 and report["last_success"]  # from the run before
    assert "state:        refused at the last run: " + reason[:40] in host("status").out
    values, _ = metrics(host)
    assert values["isconf_last_run_exit_code"] == 4 and values["state"] == ["refused"]


def test_an_unreachable_mirror_is_shown_before_the_first_fetch(author, monitored, server):
    host = monitored
    server.stop()
    host("up", expect="unreachable")
    report = status(host)
    assert report["state"] == "unreachable" and report["fetched"] is False
    assert "no mirror could be reached" in report["last_run"]["reason"]
    values, _ = metrics(host)
    assert values["isconf_last_run_exit_code"] == 3 and values["state"] == ["unreachable"]
    server.__init__(author.repo, server.log_path)  # the fixture stops it again


def test_a_disabled_host_records_its_run_too(author, monitored):
    host = monitored
    host("disable", "-m", "maintenance", expect="ok")
    assert host("up").returncode == 9
    report = status(host)
    assert report["state"] == "disabled" and report["last_run"]["result"] == "disabled"
    values, _ = metrics(host)
    assert values["isconf_last_run_exit_code"] == 9 and values["isconf_disabled"] == 1


def test_a_pending_reboot_is_shown_and_is_no_success(author, monitored):
    host = monitored
    marker = host.path("/rebooted")
    host("init", "--force", author.repo, "--branch", "web", "--insecure", "--metrics", METRICS,
         "--reboot-command", "/bin/touch " + marker, expect="ok")
    author.commit(["reboot"], ["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="reboot")
    report = status(host)
    assert report["state"] == "reboot" and report["reboot"]["seq"] == 1 and report["last_run"]["result"] == "reboot"
    assert "reboot:       seq 1 is a reboot" in host("status").out
    host("up", "-r", expect="ok")
    report = status(host)
    # the reboot is done, seq 2 waits for the next 'up': something was left to apply
    assert os.path.exists(marker) and report["state"] == "pending" and report["last_success"] is None


def test_a_declared_baseline_before_the_first_fetch(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys, "--baseline", "2")
    assert status(host)["state"] == "baseline"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_running_busy_then_interrupted(author, monitored, stop):
    # One run holds the lock inside a transaction: status names it (pid, since, which transaction) without
    # taking the lock; a second run is busy and says so in the record; stopped in the middle, the first is
    # 'interrupted': killed, it leaves its name in the lock file, and the kernel says it is gone; stopped
    # by SIGTERM, it records its own end.
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/true"], ["exec", "--no-run", "--", "/bin/sh", "-c", WAIT])
    agent = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not os.path.exists(host.path("/tmp/started")):
            assert agent.poll() is None and time.time() < deadline
            time.sleep(0.05)
        report = status(host)
        assert report["state"] == "running" and report["running"]["pid"] == agent.pid
        assert report["running"]["since"].startswith("20") and report["running"]["transaction"]["seq"] == 2
        assert "running:      pid %d since 20" % agent.pid in host("status").out
        host("up", expect="busy")
        assert last_run(host)["result"] == "busy"
        values, _ = metrics(host)
        assert values["isconf_last_run_exit_code"] == 6 and values["state"] == ["running"]
        agent.send_signal(stop)
        assert agent.wait(30) == (-signal.SIGKILL if stop == signal.SIGKILL else 128 + signal.SIGTERM)
    finally:
        open(host.path("/tmp/go"), "w").close()  # the transaction's own process ends too
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    report = status(host)
    assert report["state"] == "interrupted" and report["running"] is None
    assert report["interrupted"]["seq"] == 2 and report["interrupted"]["summary"].startswith("exec /bin/sh")
    assert "INTERRUPTED:  seq 2 exec /bin/sh" in host("status").out
    if stop == signal.SIGTERM:
        assert (last_run(host)["result"], last_run(host)["exit_code"]) == ("interrupted", 143)
    else:
        assert last_run(host)["result"] == "busy"  # a killed run records nothing: status still knows
    host("up", expect="ok")
    assert status(host)["state"] == "up-to-date"


# --- up --dry-run ---------------------------------------------------------------------------------------------

def test_dry_run_lists_transactions_and_objects_and_changes_nothing(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    author.commit(["snap", "/bin/busybox", "/etc/passwd"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/x"])
    before = host.snapshot(), sorted(os.listdir(host.state("objects")))
    first = last_run(host)
    assert first["result"] == "ok"
    proc = host("up", "--dry-run", "--json", expect="pending")
    plan = json.loads(proc.out)
    assert plan["schema"] == 1 and (plan["applied_seq"], plan["head_seq"]) == (1, 3)
    assert [(t["seq"], t["kind"]) for t in plan["transactions"]] == [(2, "snap"), (3, "exec")]
    assert plan["transactions"][1]["summary"] == "exec /bin/touch /tmp/x"
    sizes = sorted(os.path.getsize(p) for p in ("/bin/busybox", "/etc/passwd"))  # the author snaps its own
    assert sorted(o["size"] for o in plan["objects"]) == sizes and not any(o["staged"] for o in plan["objects"])
    assert plan["fetch_bytes"] == sum(sizes)
    assert (host.snapshot(), sorted(os.listdir(host.state("objects")))) == before
    assert last_run(host) == first  # still the first up's: a dry run records no run
    text = host("up", "--dry-run", expect="pending").out
    assert "would apply 3 exec /bin/touch /tmp/x" in text and "%d bytes to fetch" % sum(sizes) in text
    host("up", expect="ok")
    assert host("up", "--dry-run", expect="ok").out.endswith("0 pending on branch web, 0 bytes to fetch (dry run: "
                                                             "nothing applied)\n")


def test_json_without_dry_run_is_a_usage_error(host):
    assert "--dry-run" in error_line(host("up", "--json", expect="usage"))


# --- the metrics file ------------------------------------------------------------------------------------------

def test_metric_label_values_are_escaped_as_the_format_wants(isconf):
    report = {"last_run": None, "last_success": None, "applied_seq": 0, "head_seq": 0, "pending": 0,
              "failed": None, "disabled": None, "branch": 'we"b\\x\nnext', "applied_id": "0" * 64,
              "state": "never-fetched"}
    families = list(text_string_to_metric_families(isconf.render_metrics(report).decode()))
    info = [s for f in families for s in f.samples if s.name == "isconf_info"]
    assert info[0].labels["branch"] == 'we"b\\x\nnext'
    assert all(f.documentation and f.type == "gauge" for f in families)


@pytest.mark.parametrize("path", ["relative.prom", "/var/lib/isconf.txt", "/var/../etc/x.prom"])
def test_init_metrics_takes_an_absolute_prom_path(host, keys, path):
    proc = host("init", "/srv", "--branch", "web", "--signers", keys.signers, "--metrics", path, expect="usage")
    assert "metrics" in error_line(proc)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_metrics_file_that_is_not_a_regular_file_is_left_alone(author, monitored, tmp_path, kind):
    host = monitored
    outside = tmp_path / "outside.prom"
    outside.write_text("precious\n")
    if kind == "link":
        os.symlink(str(outside), host.path(METRICS))
    else:
        os.mkfifo(host.path(METRICS))
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    proc = host("up", expect="ok", timeout=60)  # a FIFO is never opened: no writer blocks
    assert "metrics not written" in proc.err and "where isconf keeps a regular file" in proc.err
    assert outside.read_text() == "precious\n"
    assert os.path.islink(host.path(METRICS)) if kind == "link" else not os.path.isfile(host.path(METRICS))


def test_a_metrics_directory_reached_through_a_link_stays_inside_the_root(author, server, keys, host,
                                                                         busybox_root, tmp_path):
    # An absolute link inside the root leads where a chroot would take it, never to the miniroot's own path.
    busybox_root(host.root)
    outside = tmp_path / "collector"
    outside.mkdir()
    os.makedirs(host.path("/var/lib/node_exporter"))
    os.makedirs(host.path(str(outside)))
    os.symlink(str(outside), host.path("/var/lib/node_exporter/textfile_collector"))
    host.init(server.url, keys, "--metrics", METRICS)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    assert os.listdir(str(outside)) == [] and os.path.isfile(host.path(str(outside / "isconf.prom")))


def test_a_run_on_damaged_state_still_leaves_its_exit_code_in_the_metrics(author, monitored):
    host = monitored
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    with open(host.state("history"), "ab") as f:
        f.write(b"[not a record]\n{}\n")
    host("up", expect="state")
    values, info = metrics(host)  # what can be read: the run's result, nothing the damaged state would say
    assert values["isconf_last_run_exit_code"] == 7 and "isconf_applied_seq" not in values and info is None


def test_the_metrics_and_skip_read_the_journal_and_history_as_a_run_does_from_their_ends(author, monitored):
    # A host polled for years holds a long journal and history: the metrics after each run read what the run
    # read, not the whole of either (status does).  Damage far back in both shows it: status, which reads
    # them all, finds it; the run and its metrics do not need them.
    host = monitored
    author.commit(*[["exec", "--no-run", "--", "/bin/true", str(n)] for n in range(1, 71)])  # more than a batch
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/false"])
    with open(host.state("journal"), "rb") as f:
        journal = f.read()
    assert journal.count(b'"/bin/true","1"') == 1
    replace_file(host.root, "var/lib/isconf/journal", journal.replace(b'"/bin/true","1"', b'"/bin/true","9"'), 0o600)
    with open(host.state("history"), "rb") as f:
        history = f.read()
    replace_file(host.root, "var/lib/isconf/history", b"[damaged]\n" + history, 0o600)
    host("status", expect="state")
    proc = host("up", expect="failed")
    assert "metrics not written" not in proc.err, proc.err
    values, info = metrics(host)
    assert values["isconf_applied_seq"] == 70 and values["isconf_failed_seq"] == 71, values
    assert values["isconf_pending_transactions"] == 1 and values["state"] == ["failed"], values
    host("skip", "71", "-m", "not on this host", expect="ok")  # skip reads as a run does too
    values, info = metrics(host)
    assert values["isconf_applied_seq"] == 71 and values["state"] == ["up-to-date"], values


BUGGY = """
import sys
sys.path.insert(0, sys.argv[1])
import isconf
def bug(args, host, record):
    raise ZeroDivisionError("a bug in the agent")
isconf.up = bug
sys.exit(isconf.main(sys.argv[2:]))
"""


def test_a_bug_in_up_is_recorded_as_an_internal_error(author, monitored):
    host = monitored
    proc = subprocess.run([sys.executable, "-I", "-c", BUGGY, os.path.dirname(ISCONF), "--root", host.root, "up"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 70, proc.stderr
    record = last_run(host)
    assert (record["result"], record["exit_code"]) == ("internal-error", 70)
    assert "ZeroDivisionError: a bug in the agent" in record["reason"]
    assert metrics(host)[0]["isconf_last_run_exit_code"] == 70


def test_log_of_a_host_that_never_fetched_says_so_not_an_empty_journal(server, keys, host):
    host.init(server.url, keys)
    proc = host("log", expect="ok")
    assert proc.out == "isconf: no journal verified on %s yet: run 'isconf up'\n" % host.root, proc.out
    assert host("log", "--json", expect="ok").out == "[]\n"
