"""End to end: author a journal, serve it, replay it on a fresh root."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import stat

import pytest

from conftest import ISCONF, MTIME, PYTHONS, Host, canary_ahead, error_line, extents, make_source, source_tree

def author_journal(author, src):
    author("lock", "-m", "build the app host")
    author("--root", src, "snap", "/etc/app", "/etc/app/app.conf", "/etc/app/app.conf.link",
           "/etc/app/current", "/etc/app/sparse.img")
    author("exec", "--no-run", "--", "/bin/sh", "-c", "cat /etc/app/app.conf > /tmp/seen; echo $ISCONF_SEQ >> /tmp/seen")
    author("exec", "--no-run", "--cwd", "/etc/app", "--", "/bin/sh", "-c", "pwd > /tmp/cwd")
    author.ci()


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: p.split("/")[-3])
def test_replay_reproduces_every_kind_of_file(python, author, server, keys, tmp_path, busybox_root):
    src = str(tmp_path / "src")
    make_source(src, busybox_root)
    author_journal(author, src)
    host = Host(str(tmp_path / "host"), python=python)
    busybox_root(host.root)
    host.init(server.url, keys)
    host("up", expect="ok")

    conf = os.stat(host.path("/etc/app/app.conf"))
    assert open(host.path("/etc/app/app.conf")).read() == "listen 8080\n"
    assert (stat.S_IMODE(conf.st_mode), conf.st_uid, conf.st_gid, conf.st_mtime_ns) == (0o640, 0, 33, MTIME)
    assert os.stat(host.path("/etc/app/app.conf.link")).st_ino == conf.st_ino
    assert conf.st_nlink == 2
    assert os.readlink(host.path("/etc/app/current")) == "app.conf"
    directory = os.stat(host.path("/etc/app"))
    assert (stat.S_IMODE(directory.st_mode), directory.st_uid, directory.st_gid) == (0o750, 33, 33)
    sparse = host.path("/etc/app/sparse.img")
    assert extents(sparse) == extents(os.path.join(src, "etc/app/sparse.img"))
    assert os.stat(sparse).st_blocks * 512 < 1024 * 1024
    with open(sparse, "rb") as f:
        assert f.read() == open(os.path.join(src, "etc/app/sparse.img"), "rb").read()
    assert open(host.path("/tmp/seen")).read() == "listen 8080\n2\n"
    assert open(host.path("/tmp/cwd")).read() == "/etc/app\n"

    # An up-to-date host costs one conditional request and applies nothing.
    before, mark = host.snapshot(), server.mark()
    again = host("up", expect="ok")
    assert "up to date" in again.out
    assert len(server.requests()[mark:]) == 1
    assert host.snapshot() == before


def test_failing_exec_halts_then_resumes_once_fixed(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /tmp/ready"],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    host.init(server.url, keys)
    failed = host("up", expect="failed")
    assert "transaction 1 failed" in error_line(failed)
    assert not os.path.exists(host.path("/tmp/after"))
    status = host.status()
    assert status["failed"]["seq"] == 1 and status["applied_seq"] == 0 and status["pending"] == 2
    assert "exit status 1" in "\n".join(status["failed"]["log_tail"])

    open(host.path("/tmp/ready"), "w").close()
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/after"))
    assert host.status()["failed"] is None and host.status()["applied_seq"] == 2


def test_new_entries_are_fetched_with_a_range_request(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(server.url, keys)
    host("up", expect="ok")
    length = os.path.getsize(author.path("journal"))
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    mark = server.mark()
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/two"))
    journal_requests = [l for l in server.requests()[mark:] if "/journal " in l]
    assert len(journal_requests) == 1 and "range=bytes=%d-" % length in journal_requests[0]
    assert '" 206' in journal_requests[0]


def test_snaps_apply_with_an_empty_path(author, server, keys, host, tmp_path):
    # The agent starts no program of its own: with no PATH at all, snaps still apply.
    src = source_tree(tmp_path, "/etc/motd", "welcome\n")
    author.commit(["--root", src, "snap", "/etc/motd"])
    host.init(server.url, keys)
    host("up", env={"PATH": ""}, expect="ok")
    assert open(host.path("/etc/motd")).read() == "welcome\n"


TAMPERS = {  # each with what the check that owns it says: any other refusal would hide a missing check
    # A letter of the author's name: still valid JSON, so only the hash chain can tell.
    "a changed byte in an entry": (lambda a: flip(a.path("journal"), a.journal().index(b"alice")), "hash chain broken"),
    "a truncated journal": (lambda a: truncate(a.path("journal"), -10), "truncated or padded"),
    "a head that does not match": (lambda a: rewrite_head(a, seq=1), "does not end at the entry the signed head"),
    "an object whose content changed": (lambda a: flip(object_path(a), 0), "does not match the signed journal"),
}


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(path, delta):
    os.truncate(path, os.path.getsize(path) + delta)


def append(path, data):
    with open(path, "ab") as f:
        f.write(data)


def rewrite_head(author, **changes):
    head = json.loads(open(author.path("head")).read())
    head.update(changes)
    with open(author.path("head"), "w") as f:
        f.write(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")


def object_path(author):
    objects = os.path.join(author.repo, "objects")
    return os.path.join(objects, sorted(os.listdir(objects))[0])


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_repository_is_refused_and_nothing_applied(tamper, author, server, host, tmp_path, busybox_root):
    # Unsigned here, so the chain, length and hashes alone must catch it; signatures are tested apart.
    author.keys = None
    busybox_root(host.root)
    src = source_tree(tmp_path, "/etc/motd", "welcome\n")
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/ran"])
    make, says = TAMPERS[tamper]
    make(author)
    host.init(server.url, None)
    before = host.snapshot()
    refused = host("up", expect="refused")
    assert says in error_line(refused), error_line(refused)
    assert not os.path.exists(host.path("/etc/motd")) and not os.path.exists(host.path("/tmp/ran"))
    assert host.snapshot() == before


def test_dry_run_shows_pending_and_applies_nothing(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/x"])
    host.init(server.url, keys)
    dry = host("up", "--dry-run", expect="pending")
    assert "would apply 1 exec /bin/touch /tmp/x" in dry.out
    assert not os.path.exists(host.path("/tmp/x"))
    assert host.status()["applied_seq"] == 0


def test_reboot_entry_stops_without_r_and_reboots_with_it(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"], ["reboot"],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    marker = host.path("/rebooted")
    host.init(server.url, keys, "--reboot-command", "/bin/touch " + marker)
    host("up", expect="reboot")
    assert os.path.exists(host.path("/tmp/before")) and not os.path.exists(marker)
    host("up", "-r", expect="ok")
    assert os.path.exists(marker) and not os.path.exists(host.path("/tmp/after"))
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/after"))


def test_two_runs_at_once_the_second_is_busy(author, server, keys, host):
    author.commit(["reboot"])
    host.init(server.url, keys)
    with open(host.state("lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        busy = host("up", expect="busy")
    assert "busy" in error_line(busy)


def test_skip_records_a_failed_transaction_for_good(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/false"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/next"])
    host.init(server.url, keys)
    host("up", expect="failed")
    host("skip", "2", "-m", "not yet", expect="usage")
    host("skip", "1", "-m", "false is broken on this model", expect="ok")
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/next"))
    status = host.status()
    assert status["skipped"][0]["seq"] == 1 and "broken" in status["skipped"][0]["why"]
    log = json.loads(host("log", "--json", expect="ok").out)
    assert [(e["seq"], e["state"]) for e in log] == [(2, "applied"), (1, "skipped")]


def test_log_marks_applied_failed_and_pending_newest_first(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"], ["exec", "--no-run", "--", "/bin/false"],
                  ["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys)
    host("up", expect="failed")
    log = json.loads(host("log", "--json", expect="ok").out)
    assert [(e["seq"], e["state"]) for e in log] == [(3, "pending"), (2, "failed"), (1, "applied")]
    assert len(json.loads(host("log", "--json", "-n", "1", expect="ok").out)) == 1
    assert "failed" in host("log", expect="ok").out


def test_exec_gets_the_documented_environment_and_host_variables(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "env | sort > /tmp/env"])
    host.init(server.url, keys, "--var", "ROLE=frontend", "--var", "DC=ams1")
    host("up", env={"SECRET_FROM_CALLER": "leak"}, expect="ok")
    env = dict(line.split("=", 1) for line in open(host.path("/tmp/env")).read().splitlines())
    assert env["ROLE"] == "frontend" and env["DC"] == "ams1" and env["LC_ALL"] == "C"
    assert env["ISCONF_BRANCH"] == "web" and env["ISCONF_SEQ"] == "1" and len(env["ISCONF_ID"]) == 64
    assert "SECRET_FROM_CALLER" not in env


@pytest.mark.parametrize("scheme", ["file://", ""])
def test_mirrors_are_tried_in_order_and_directories_work(scheme, author, keys, host):
    # The first mirror refuses connections; the second is a file:// URL or a plain directory (a mounted disc).
    author.commit(["reboot"])
    host.init(["http://127.0.0.1:9/", scheme + author.repo], keys)
    host("up", expect="reboot")
    assert host.status()["head_seq"] == 1


def test_fork_and_migrate_follow_a_branch_that_extends_the_host(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    canary_ahead(author, keys, host)
    host("migrate", "canary", expect="ok")
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/canary")) and host.status()["branch"] == "canary"


def test_migrate_refuses_a_branch_that_rewrites_history(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/base"])
    host.init(server.url, keys)
    host("up", expect="ok")
    other = type(author)(author.repo, branch="other", keys=keys)
    other.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/different"])
    refused = host("migrate", "other", expect="refused")
    assert "does not extend" in error_line(refused)
    assert host.status()["branch"] == "web"


def test_a_crashed_ci_leaves_bytes_hosts_ignore_and_the_next_ci_cuts(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    append(author.path("journal"), b'{"half an entry')
    host.init(server.url, keys)
    host("up", expect="ok")
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/two"))
    assert b"half an entry" not in author.journal()


def test_a_rewritten_journal_is_refused_even_when_the_local_copy_is_lost(author, server, keys, host, busybox_root):
    # The history of what was applied, not the journal copy, is what the host holds to.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/a"])
    host.init(server.url, keys)
    host("up", expect="ok")
    shutil.rmtree(author.path())
    author.forget_seen_head()
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/b"], ["exec", "--no-run", "--", "/bin/true"])
    for name in ("journal", "head", "head.sig"):
        os.unlink(host.state(name))
    refused = host("up", expect="refused")
    assert "does not extend what this host has applied" in error_line(refused)
    assert not os.path.exists(host.path("/tmp/b"))


def test_two_ups_started_together_one_runs_the_other_is_busy(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "sleep 2; echo ran >> /tmp/runs"])
    host.init(server.url, keys)
    procs = [subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    results = sorted((p.wait(60), p.stderr.read().decode()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0, 6] and "busy" in results[1][1]
    assert open(host.path("/tmp/runs")).read() == "ran\n"


IMPORTS_AFTER_FIRST_TRANSACTION = """
import sys
sys.path.insert(0, sys.argv[1])
import isconf
at_first, Base = [], isconf.Transaction
class Transaction(Base):  # what sys.modules holds as the first transaction starts, then called through
    def __init__(self, *args, **kw):
        at_first.append(at_first[0] if at_first else set(sys.modules))
        Base.__init__(self, *args, **kw)
isconf.Transaction = Transaction
code = isconf.main(["--root", sys.argv[2], "up"])
print(code, len(at_first), sorted(set(sys.modules) - at_first[0]))
"""


def test_a_run_imports_nothing_after_its_first_transaction_starts(author, server, keys, host, tmp_path):
    # A transaction may replace the standard library under a running agent: it must already hold all it
    # needs when the first one starts (rule 6), though an up-to-date run imports less (test_upgrade).
    src = source_tree(tmp_path, "/etc/motd", "x\n")
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url.replace("127.0.0.1", "localhost"), keys)
    proc = subprocess.run([sys.executable, "-I", "-c", IMPORTS_AFTER_FIRST_TRANSACTION, os.path.dirname(ISCONF),
                           host.root], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.decode().strip().splitlines()[-1] == "1 2 []", proc.stderr  # /bin/true is not in this empty root: the exec fails, after the snap


def test_a_passwd_line_with_a_non_ascii_number_is_skipped_with_a_warning(author, server, keys, host, tmp_path):
    src = source_tree(tmp_path, "/srv/www.conf", "x\n")
    author.commit(["--root", src, "snap", "/srv/www.conf"])
    os.makedirs(host.path("/etc"))
    with open(host.path("/etc/passwd"), "w") as f:
        f.write("root:x:0:0::/root:/bin/sh\nodd:x:\u00b2:0::/:/bin/false\n\n")
    host.init(server.url, keys)
    up = host("up", expect="ok")
    assert "etc/passwd line 2 is not NAME:PASSWORD:NUMBER" in up.err
    assert os.path.exists(host.path("/srv/www.conf"))
