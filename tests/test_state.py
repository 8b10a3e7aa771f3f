"""Host state: transactions known by their id, the state format version, and file modes."""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import Author, TOP, error_line


def failing_web_and_canary(author, keys, host):
    """A host that applied web's seq 1 and failed web's seq 2; canary forked after seq 1 with its own seq 2."""
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/base"])
    host("up", expect="ok")
    author("fork", "canary", "--sign", keys.private)
    canary = Author(author.repo, branch="canary", keys=keys)
    canary.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/canary"])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo web two; test -e /tmp/never"])
    host("up", expect="failed")
    assert host.status()["failed"]["seq"] == 2
    host("migrate", "canary", expect="ok")
    return canary


def test_after_migrate_status_does_not_blame_the_new_branch_for_the_old_ones_failure(author, server, keys, host,
                                                                                       busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    failing_web_and_canary(author, keys, host)
    report = host.status()
    assert report["failed"] is None and report["applied_seq"] == 1 and report["pending"] == 1
    states = {e["seq"]: e["state"] for e in json.loads(host("log", "--json", expect="ok").out)}
    assert states == {1: "applied", 2: "pending"}


def test_after_migrate_skip_refuses_a_seq_whose_entry_never_failed_here(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    failing_web_and_canary(author, keys, host)
    refused = host("skip", "2", "-m", "not this one", expect="usage")
    assert "has not failed here" in error_line(refused)
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/canary")) and host.status()["applied_seq"] == 2


def test_two_branches_seq_n_never_share_a_log(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    failing_web_and_canary(author, keys, host)
    host("up", expect="ok")
    seq2 = sorted(n for n in os.listdir(host.state("logs")) if n.startswith("000002-"))
    assert len(seq2) == 2, seq2  # web's failed seq 2 and canary's applied seq 2
    texts = [open(host.state("logs", n)).read() for n in seq2]
    assert sum("web two" in t for t in texts) == 1 and sum("/tmp/canary" in t for t in texts) == 1


def old_isconf(tmp_path):
    """isconf.py 0.1.0, from git history, beside a copy of nothing else."""
    path = str(tmp_path / "isconf-0.1.0.py")
    with open(path, "wb") as f:
        f.write(subprocess.run(["git", "-C", TOP, "show", "61bf2a6:isconf.py"], check=True,
                               stdout=subprocess.PIPE).stdout)
    return path


def test_a_host_whose_state_0_1_0_wrote_continues_with_nothing_lost_or_run_again(author, server, keys, host,
                                                                                 busybox_root, tmp_path):
    busybox_root(host.root)
    old = old_isconf(tmp_path)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo x >> /tmp/runs"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "echo attempt; test -e /tmp/fixed"])

    def run_old(*args):
        return subprocess.run([sys.executable, "-I", old, "--root", host.root] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
    assert run_old("init", server.url, "--branch", "web", "--signers", keys.signers).returncode == 0
    assert run_old("up").returncode == 1
    assert sorted(os.listdir(host.state("logs"))) == ["000001.log", "000002.log"]
    report = host.status()  # the new version reads the old state as it is
    assert report["applied_seq"] == 1 and report["failed"]["seq"] == 2
    assert "exited with status 1" in report["failed"]["error"] and "attempt" in "\n".join(report["failed"]["log_tail"])
    open(host.path("/tmp/fixed"), "w").close()
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/three"])
    host("up", expect="ok")
    assert open(host.path("/tmp/runs")).read() == "x\n"  # nothing ran again
    assert os.path.exists(host.path("/tmp/three")) and host.status()["applied_seq"] == 3
    logs = sorted(os.listdir(host.state("logs")))
    assert [n[:7] for n in logs] == ["000001-", "000002-", "000003-"], logs
    assert open(host.state("logs", logs[1])).read().count("\nattempt\n") == 2  # the old attempt kept, then the new
    assert open(host.state("state-format")).read() == "2\n"
    assert [mode(host.state("logs", n)) for n in logs] == [0o600] * 3  # 0.1.0 wrote them 0644


def test_an_agent_older_than_the_state_it_finds_refuses(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(server.url, keys)
    with open(host.state("state-format"), "w") as f:
        f.write("3\n")
    for verb in ("up", "status"):
        line = error_line(host(verb, expect="state"))
        assert "format 3, written by a newer isconf" in line, line
    assert not os.path.exists(host.path("/tmp/one"))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_the_config_0600_and_the_state_directory_0700(server, keys, host):
    host.init(server.url, keys, "--var", "SECRET=s3cret")
    assert mode(host.path("/etc/isconf/isconf.conf")) == 0o600
    assert mode(host.state()) == 0o700


def test_migrate_and_init_force_keep_the_configs_mode_and_owner(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    conf = host.path("/etc/isconf/isconf.conf")
    os.chown(conf, 0, 1234)
    os.chmod(conf, 0o640)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/base"])
    author("fork", "canary", "--sign", keys.private)
    host("migrate", "canary", expect="ok")
    assert "branch = canary" in open(conf).read()
    assert mode(conf) == 0o640 and os.stat(conf).st_gid == 1234
    host("init", server.url, "--branch", "canary", "--signers", keys.signers, "--force", expect="ok")
    assert mode(conf) == 0o640 and os.stat(conf).st_gid == 1234


def test_transaction_logs_are_0600(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo secret"])
    host.init(server.url, keys)
    host("up", expect="ok")
    logs = os.listdir(host.state("logs"))
    assert len(logs) == 1 and mode(host.state("logs", logs[0])) == 0o600


def run_old(old, host, *args):
    return subprocess.run([sys.executable, "-I", old, "--root", host.root] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.parametrize("verb", ["up", "init --force"])
def test_the_state_upgrade_makes_a_config_0_1_0_wrote_0644_private(author, keys, host, busybox_root, tmp_path, verb):
    # 0.1.0 gave the config, [env] secrets and all, mode 0644 and no choice.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    assert run_old(old_isconf(tmp_path), host, "init", author.repo, "--branch", "web", "--signers", keys.signers,
                   "--var", "SECRET=s3cret").returncode == 0
    conf = host.path("/etc/isconf/isconf.conf")
    assert mode(conf) == 0o644
    host(*(verb.split() + ([author.repo, "--branch", "web", "--signers", keys.signers] if "init" in verb else [])),
         expect="ok")
    assert mode(conf) == 0o600


def test_the_state_upgrade_keeps_a_config_mode_the_admin_chose(author, keys, host, busybox_root, tmp_path):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    assert run_old(old_isconf(tmp_path), host, "init", author.repo, "--branch", "web", "--signers",
                   keys.signers).returncode == 0
    conf = host.path("/etc/isconf/isconf.conf")
    os.chmod(conf, 0o640)
    host("up", expect="ok")
    assert mode(conf) == 0o640
    os.chmod(conf, 0o644)  # chosen after the upgrade: kept too
    host("up", expect="ok")
    assert mode(conf) == 0o644


def test_status_before_the_upgrade_names_the_log_its_tail_came_from(author, keys, host, busybox_root, tmp_path):
    busybox_root(host.root)
    old = old_isconf(tmp_path)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo attempt; false"])
    assert run_old(old, host, "init", author.repo, "--branch", "web", "--signers", keys.signers).returncode == 0
    assert run_old(old, host, "up").returncode == 1
    failed = host.status()["failed"]
    assert failed["log"] == host.state("logs", "000001.log") and "attempt" in failed["log_tail"], failed
    assert "log %s:" % host.state("logs", "000001.log") in host("status", expect="failed").out


LONG = "x" * 100000  # one entry of ~100 KB: more than the 64 KiB chunks the local journal is read back by


def halted_between_long_entries(author, server, keys, host, busybox_root):
    """A host that applied seq 1 and 2 (long), failed at 3 (long); 4 is pending.  Returns the journal's lines."""
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true", "one"],
                  ["exec", "--no-run", "--", "/bin/true", LONG],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /tmp/go", LONG],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/four"])
    host.init(server.url, keys)
    host("up", expect="failed")
    assert host.status()["applied_seq"] == 2
    return author.journal().split(b"\n")[:-1]


def test_a_run_reads_the_local_journal_back_from_the_head_across_long_entries(author, server, keys, host,
                                                                               busybox_root):
    # The run after the failure reads the local copy backwards as far as the applied entry (seq 2).
    halted_between_long_entries(author, server, keys, host, busybox_root)
    open(host.path("/tmp/go"), "w").close()
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/four")) and host.status()["applied_seq"] == 4


@pytest.mark.parametrize("damage", ["a byte of the pending entry", "a byte of the last applied entry",
                                    "the last bytes cut off"])
def test_a_damaged_local_journal_from_the_applied_entry_on_is_a_state_error(damage, author, server, keys, host,
                                                                            busybox_root):
    lines = halted_between_long_entries(author, server, keys, host, busybox_root)
    open(host.path("/tmp/go"), "w").close()
    path = host.state("journal")
    with open(path, "r+b") as f:
        if damage == "the last bytes cut off":
            f.truncate(sum(len(l) + 1 for l in lines) - 10)
        else:
            seq, word = (4, b"four") if damage == "a byte of the pending entry" else (2, b"xxxx")
            f.seek(sum(len(l) + 1 for l in lines[:seq - 1]) + lines[seq - 1].index(word))  # inside its argv
            f.write(b"y")  # still canonical JSON: only the chain from the applied entry to the head tells
    line = error_line(host("up", expect="state"))
    assert "local journal" in line and "run 'isconf up' to fetch the journal again" in line, line
    assert not os.path.exists(host.path("/tmp/four"))
