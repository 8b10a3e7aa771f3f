"""The author's side: the branch lock, staging, ci, fork, and what a crash leaves."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ISCONF, TOP, error_line

sys.path.insert(0, TOP)
import isconf  # noqa: E402  (to check journals with the same code hosts use)


def entries(author):
    return isconf.verify_chain(author.journal(), 0, isconf.ZERO_ID)


def test_lock_is_refused_while_someone_else_holds_it(author):
    author("lock", "-m", "alice's change")
    bob = {"ISCONF_AUTHOR": "bob@example"}
    busy = author("lock", "-m", "bob's change", env=bob, expect="busy")
    assert "locked by alice@example" in error_line(busy) and "alice's change" in error_line(busy)
    author("exec", "--no-run", "--", "/bin/true", env=bob, expect="busy")
    author("ci", "--unsigned", env=bob, expect="busy")


def test_unlock_force_breaks_a_lock_loudly_and_discards_the_staged_work(author):
    author("lock", "-m", "alice's change")
    author("reboot")
    bob = {"ISCONF_AUTHOR": "bob@example"}
    author("unlock", env=bob, expect="busy")
    broken = author("unlock", "--force", env=bob)
    assert "breaking alice@example's lock" in broken.err and "DISCARDING 1 staged" in broken.err
    author("lock", "-m", "bob's turn", env=bob)
    author("reboot", env=bob)
    author.ci(env=bob)
    assert [e.fields["author"] for e in entries(author)] == ["bob@example"]


def test_staging_and_ci_need_the_lock(author):
    author.commit(["reboot"])
    assert "not locked" in error_line(author("reboot", expect="usage"))
    author("lock", "-m", "x")
    assert "nothing staged" in error_line(author.ci(expect="usage"))


def test_exec_runs_now_and_stages_only_on_success(author, tmp_path, busybox_root):
    root = str(tmp_path / "authoring-root")
    busybox_root(root)
    author("lock", "-m", "try commands")
    failed = author("--root", root, "exec", "--", "/bin/sh", "-c", "echo trying; exit 3", expect="failed")
    assert "exited with status 3; nothing staged" in error_line(failed) and "trying" in failed.out
    author("--root", root, "exec", "--cwd", "/tmp", "--", "/bin/touch", "made-here")
    assert os.path.exists(os.path.join(root, "tmp/made-here"))
    author.ci()
    assert [(e.fields["argv"], e.fields["cwd"]) for e in entries(author)] == [(["/bin/touch", "made-here"], "/tmp")]


def test_exec_on_the_authors_own_root_runs_in_the_given_directory(author, tmp_path):
    # --root /: no chroot, so the command starts without Python code in the child; --cwd still holds.
    work = str(tmp_path / "work")
    os.makedirs(work)
    author("lock", "-m", "here")
    author("--root", "/", "exec", "--cwd", work, "--", "/bin/sh", "-c", "pwd > where; echo $ISCONF_SEQ > seq")
    assert open(os.path.join(work, "where")).read() == work + "\n"
    assert open(os.path.join(work, "seq")).read() == "0\n"  # the documented environment, not the author's


def test_ci_message_falls_back_to_the_lock_reason(author):
    author("lock", "-m", "why we lock")
    author("reboot")
    author("reboot", "-m", "its own message")
    author.ci()
    assert [e.fields["message"] for e in entries(author)] == ["why we lock", "its own message"]
    author("lock", "-m", "second")
    author("reboot")
    author.ci("-m", "the ci message")
    assert entries(author)[-1].fields["message"] == "the ci message"


@pytest.mark.parametrize("path,fragment", [
    ("etc/motd", "not an absolute"),
    ("/etc/../etc/motd", "not an absolute"),
    ("/no/such/file", "No such file"),
    ("/dev-null", "not a regular file"),
])
def test_snap_refuses_bad_paths_and_stages_nothing(path, fragment, author, tmp_path):
    root = str(tmp_path / "src")
    os.makedirs(root)
    os.mkfifo(os.path.join(root, "dev-null"))
    author("lock", "-m", "x")
    assert fragment in error_line(author("--root", root, "snap", path, expect="usage"))
    assert "nothing staged" in error_line(author.ci(expect="usage"))


def test_concurrent_authors_never_interleave_or_lose_entries(author, tmp_path):
    # Two authors each publish ten changes as fast as the lock lets them.
    script = tmp_path / "author.sh"
    script.write_text("""
for i in $(seq 1 10); do
  until %(isconf)s lock -m "change $i" 2>/dev/null; do sleep 0.01; done
  %(isconf)s exec --no-run -- /bin/echo "$ISCONF_AUTHOR" "$i" >/dev/null
  %(isconf)s exec --no-run -- /bin/echo "$ISCONF_AUTHOR" "$i" again >/dev/null
  %(isconf)s ci --sign %(key)s >/dev/null
done
""" % {"isconf": "%s -I %s" % (sys.executable, ISCONF), "key": author.keys.private})
    author.commit(["reboot"], why="the branch, started")
    env = dict(os.environ, ISCONF_REPO=author.repo, ISCONF_BRANCH=author.branch, ISCONF_SIGNERS=author.keys.signers)
    procs = [subprocess.Popen(["sh", str(script)], env=dict(env, ISCONF_AUTHOR=who), start_new_session=True)
             for who in ("alice@example", "bob@example")]
    try:
        assert [p.wait(300) for p in procs] == [0, 0]
    finally:
        for p in procs:  # a loop that cannot take the lock must not outlive the test
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    journal = entries(author)[1:]
    assert len(journal) == 40
    # Each ci's two entries stay together, in order, under their author.
    for first, second in zip(journal[::2], journal[1::2]):
        assert first.fields["argv"][1:] == second.fields["argv"][1:-1] and second.fields["argv"][-1] == "again"
    assert sorted(e.fields["argv"][1] for e in journal) == ["alice@example"] * 20 + ["bob@example"] * 20


def test_failed_signing_changes_nothing_and_keeps_the_staged_work(author):
    author("lock", "-m", "x")
    author("reboot")
    before = (author.journal(), open(author.path("head"), "rb").read()) if os.path.exists(author.path("head")) \
        else (b"", None)
    assert "is not a file" in error_line(author("ci", "--sign", "/no/such/key", expect="usage"))
    garbage = os.path.join(author.repo, "..", "not-a-key")
    with open(garbage, "w") as f:
        f.write("not a key\n")
    assert "could not sign" in error_line(author("ci", "--sign", garbage, expect="state"))
    assert not os.path.exists(author.path("head")) and before == (b"", None)
    author.ci()
    assert len(entries(author)) == 1


def test_an_interrupted_publication_is_finished_by_the_next_author_command(author):
    author.commit(["reboot"])
    good_head, good_sig = open(author.path("head"), "rb").read(), open(author.path("head.sig"), "rb").read()
    # As if ci died after recording the pair and writing head.sig, but before the head.
    record = os.path.join(author.repo, "authoring", author.branch, "publishing")
    with open(record, "w") as f:
        json.dump({"head": good_head.decode(), "sig": good_sig.decode()}, f)
    with open(author.path("head"), "wb") as f:
        f.write(b"stale\n")
    author("lock", "-m", "next change")
    assert open(author.path("head"), "rb").read() == good_head and not os.path.exists(record)


def test_fork_copies_the_journal_under_a_new_signed_head(author, keys):
    author.commit(["reboot"], ["reboot"])
    author("fork", "canary", "--sign", keys.private)
    with open(os.path.join(author.repo, "branches/canary/journal"), "rb") as f:
        assert f.read() == author.journal()
    head = json.loads(open(os.path.join(author.repo, "branches/canary/head")).read())
    assert (head["branch"], head["seq"]) == ("canary", 2)
    assert os.path.exists(os.path.join(author.repo, "branches/canary/head.sig"))
    assert "already exists" in error_line(author("fork", "canary", "--sign", keys.private, expect="usage"))


def test_init_repo_of_a_file_says_it_is_not_a_directory(author, tmp_path):
    path = tmp_path / "repo.tar"
    path.write_bytes(b"x")
    line = error_line(author("init-repo", str(path), expect="usage"))
    assert line == ("isconf: error: %s is not a directory: give the directory to make the repository in (made if "
                    "missing)" % path), line
    assert path.read_bytes() == b"x"


def test_init_repo_refuses_an_existing_repository(author):
    assert "already an isconf repository" in error_line(author("init-repo", author.repo, expect="state"))
