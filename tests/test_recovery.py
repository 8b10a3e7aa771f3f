"""Crash anywhere: what a power cut or a killed run leaves, and how the next run goes on."""

import json
import os
import subprocess
import sys
import time

from conftest import ISCONF, canary_ahead, error_line, source_tree


def test_a_torn_history_line_is_cut_and_the_run_goes_on(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host.init(server.url, keys)
    host("up", expect="ok")
    with open(host.state("history"), "ab") as f:
        f.write(b'{"event":"star')  # the power went out mid-append
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/two"])
    host("up", expect="ok")
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/two")) and host.status()["applied_seq"] == 2
    events = [json.loads(l) for l in open(host.state("history"), "rb").read().splitlines()]
    assert [(e["seq"], e["event"]) for e in events] == [(1, "started"), (1, "done"), (2, "started"), (2, "done")]


def test_a_transaction_interrupted_mid_way_runs_again(author, server, keys, host, busybox_root):
    # Killed after 'started' was recorded: no 'done', so the next run applies it (at least once).
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c",
                   "echo x >> /tmp/runs; while [ ! -e /tmp/go ]; do sleep 0.1; done"])
    host.init(server.url, keys)
    proc = subprocess.Popen([sys.executable, "-I", ISCONF, "--root", host.root, "up"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not os.path.exists(host.path("/tmp/runs")) and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert host.status()["applied_seq"] == 0
    open(host.path("/tmp/go"), "w").close()  # lets the orphaned command end, and the rerun pass
    host("up", expect="ok")
    assert open(host.path("/tmp/runs")).read() == "x\nx\n" and host.status()["applied_seq"] == 1


def test_a_lost_staged_object_is_fetched_again_after_a_304(author, server, keys, host, tmp_path, busybox_root):
    busybox_root(host.root)
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /tmp/ready"], ["--root", src, "snap", "/etc/motd"])
    host.init(server.url, keys)
    host("up", expect="failed")
    staged = os.listdir(host.state("objects"))
    assert len(staged) == 1
    os.unlink(host.state("objects", staged[0]))
    open(host.path("/tmp/ready"), "w").close()
    host("up", expect="ok")
    assert open(host.path("/etc/motd")).read() == "hello\n"


def test_a_snap_that_cannot_be_installed_fails_the_transaction(author, server, keys, host, tmp_path):
    src = source_tree(tmp_path, "/etc/app/app.conf", "x\n")
    author.commit(["--root", src, "snap", "/etc/app/app.conf"])
    os.makedirs(host.path("/etc"))
    with open(host.path("/etc/app"), "w") as f:
        f.write("a file where a directory is needed\n")
    host.init(server.url, keys)
    failed = host("up", expect="failed")
    assert "cannot install /etc/app/app.conf: Not a directory" in error_line(failed)
    assert host.status()["failed"]["seq"] == 1
    host("skip", "1", "-m", "this model keeps /etc/app as a file", expect="ok")


def test_a_retried_ci_after_its_publication_appends_nothing_twice(author):
    author("lock", "-m", "once")
    author("exec", "--no-run", "--", "/bin/echo", "once")
    work = os.path.join(author.repo, "authoring", author.branch)
    staged, lock = (open(os.path.join(work, name), "rb").read() for name in ("staged", "lock"))
    author.ci()
    journal = author.journal()
    # As if ci died after recording its publication, before it could clear its staged work.
    for name, data in (("staged", staged), ("lock", lock)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
    with open(os.path.join(work, "publishing"), "w") as f:
        json.dump({"head": open(author.path("head")).read(), "sig": open(author.path("head.sig")).read(),
                   "checkin": True}, f)
    assert "nothing staged" in error_line(author.ci(expect="usage"))
    assert author.journal() == journal and not os.path.exists(os.path.join(work, "lock"))


def test_a_torn_staged_line_can_be_discarded(author):
    author("lock", "-m", "x")
    author("reboot")
    with open(os.path.join(author.repo, "authoring", author.branch, "staged"), "ab") as f:
        f.write(b'{"kind":"reb')
    author("reboot")  # the torn line is cut before the next one is staged
    author.ci()
    assert author.journal().count(b'"kind":"reboot"') == 2


def test_up_finishes_a_migration_a_crash_interrupted(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    canary_ahead(author, keys, host)
    # migrate rewrote the config, then died before replacing the local journal copy.
    conf = host.path("/etc/isconf/isconf.conf")
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("branch = web", "branch = canary"))
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/canary"))
    assert json.loads(open(host.state("head")).read())["branch"] == "canary"


def test_long_utf8_names_install(author, server, keys, host, tmp_path):
    name = "\u00e9" * 127  # 254 bytes: a temporary name must not grow it past 255
    src = source_tree(tmp_path, "/srv/" + name, "long\n")
    author.commit(["--root", src, "snap", "/srv/" + name])
    host.init(server.url, keys)
    host("up", expect="ok")
    assert open(host.path("/srv/" + name)).read() == "long\n"


def test_up_into_a_closed_pipe_still_finishes_its_transaction(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line $i; "
                   "i=$((i+1)); done; touch /tmp/finished"])
    host.init(server.url, keys)
    pipeline = subprocess.run("%s -I %s --root %s up | head -c 10 >/dev/null; exit ${PIPESTATUS[0]}"
                              % (sys.executable, ISCONF, host.root), shell=True, executable="/bin/bash",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert pipeline.returncode == 0, pipeline.stderr
    assert os.path.exists(host.path("/tmp/finished")) and host.status()["applied_seq"] == 1


def test_the_applied_position_is_found_far_back_in_a_long_history(author, server, keys, host, busybox_root):
    # A run reads the recent end of the history; a host that failed for months must still know what it applied.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo x >> /tmp/once"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /tmp/fixed"])
    host.init(server.url, keys)
    host("up", expect="failed")
    with open(host.state("history"), "rb") as f:
        failed = f.read().splitlines()[-2:]  # the started and failed events of seq 2
    with open(host.state("history"), "ab") as f:
        f.write(b"\n".join(failed * 400) + b"\n")  # far more than the end a run reads first
    open(host.path("/tmp/fixed"), "w").close()
    host("up", expect="ok")
    assert open(host.path("/tmp/once")).read() == "x\n" and host.status()["applied_seq"] == 2


def test_a_full_disk_while_staging_is_a_local_problem_not_the_mirror(author, server, keys, host, tmp_path):
    src = source_tree(tmp_path, "/srv/big", os.urandom(3 * 1024 * 1024))
    author.commit(["--root", src, "snap", "/srv/big"])
    host.init(server.url, keys)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", host.state("objects")], check=True)
    try:
        full = host("up", expect="state")
    finally:
        subprocess.run(["umount", host.state("objects")], check=True)
    assert "No space left on device" in error_line(full) and not os.path.exists(host.path("/srv/big"))
    host("up", expect="ok")
    assert os.path.getsize(host.path("/srv/big")) == 3 * 1024 * 1024
