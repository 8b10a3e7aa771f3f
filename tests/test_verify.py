"""verify: the disk held to the last applied snap of every journaled path, from local state only."""

import json
import os
import shutil

import pytest

from conftest import Host, hard_link_then_its_file_replaced, make_source, source_tree

SNAPPED = ("/etc/app", "/etc/app/app.conf", "/etc/app/app.conf.link", "/etc/app/current", "/etc/app/sparse.img")


def replay(author, host, keys):
    """Replay the journal from the repository directory, then take the repository away: verify reads local
    state only (no network, no repository)."""
    host.init(author.repo, keys)
    host("up", expect="ok")
    os.rename(author.repo, author.repo + ".gone")
    return host


@pytest.fixture
def replayed(author, keys, tmp_path, busybox_root):
    """A host that replayed a snap of every kind of file."""
    src = str(tmp_path / "src")
    make_source(src, busybox_root)
    author.commit(["--root", src, "snap"] + list(SNAPPED))
    host = Host(str(tmp_path / "host"))
    busybox_root(host.root)
    return replay(author, host, keys)


def verify(host, *args, code=8):
    proc = host("verify", *args)
    assert proc.returncode == code, proc.out + proc.err
    return proc


def drifts(host, *args):
    return [line for line in verify(host, *args).out.splitlines() if line.startswith("drift: ")]


def test_an_untouched_replayed_root_has_no_drift(replayed):
    assert "no drift in 5 journaled paths" in verify(replayed, code=0).out
    assert json.loads(verify(replayed, "--json", code=0).out) == []
    verify(replayed, "--quick", code=0)


def test_one_journaled_path_and_one_file_installed_are_said_in_the_singular(author, keys, host, tmp_path):
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    host.init(author.repo, keys)
    assert host("install", "--cron", expect="ok").out.endswith("(cron) in %s: 2 files written\n" % host.root)
    os.unlink(host.path("/etc/cron.d/isconf"))
    assert host("install", "--cron", expect="ok").out.endswith("(cron) in %s: 1 file written\n" % host.root)
    author.commit(["--root", src, "snap", "/etc/motd"])
    host("up", expect="ok")
    assert "isconf: no drift in 1 journaled path (applied up to seq 1)" in verify(host, code=0).out
    assert "no drift in 1 journaled path\n" in host("status", expect="ok").out
    os.chmod(host.path("/etc/motd"), 0o600)
    assert "isconf: 1 drift in 1 journaled path (applied" in verify(host).out
    out = host("verify", "--repair", expect="ok").out
    assert "isconf: 1 repaired, 0 not repaired; no drift in 1 journaled path (applied" in out, out


def test_a_changed_byte_a_changed_mode_and_a_removed_file_are_named(replayed):
    conf = replayed.path("/etc/app/app.conf")
    st = os.stat(conf)
    with open(conf, "r+b") as f:
        f.write(b"L")  # "listen" -> "Listen": one byte, same size
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(replayed.path("/etc/app"), 0o755)
    os.unlink(replayed.path("/etc/app/sparse.img"))
    assert drifts(replayed) == [
        "drift: /etc/app: mode 0755, journal says 0750",
        "drift: /etc/app/app.conf: content differs",
        "drift: /etc/app/app.conf.link: content differs",  # the same inode: a hard link of it
        "drift: /etc/app/sparse.img: missing",
    ]
    found = json.loads(verify(replayed, "--json").out)
    assert {(d["path"], d["what"]) for d in found} == {("/etc/app", "mode"), ("/etc/app/app.conf", "content"),
                                                       ("/etc/app/app.conf.link", "content"),
                                                       ("/etc/app/sparse.img", "missing")}
    mode = [d for d in found if d["what"] == "mode"][0]
    assert (mode["expected"], mode["found"]) == ("0750", "0755")
    content = [d for d in found if d["path"] == "/etc/app/app.conf"][0]
    assert content["expected"]["size"] == content["found"]["size"] == 12
    assert content["expected"]["sha256"] != content["found"]["sha256"]

    # --quick trusts size and mtime: the same-size change with its old mtime goes unseen, a new size does not.
    assert drifts(replayed, "--quick") == ["drift: /etc/app: mode 0755, journal says 0750",
                                           "drift: /etc/app/sparse.img: missing"]
    with open(conf, "ab") as f:
        f.write(b"# more\n")
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime: the size alone tells
    assert "drift: /etc/app/app.conf: content differs (19 bytes, journal says 12)" in drifts(replayed, "--quick")


def test_owner_group_link_target_type_and_a_broken_hard_link_are_named(replayed):
    os.chown(replayed.path("/etc/app/app.conf"), 1, 33)
    link = replayed.path("/etc/app/app.conf.link")
    shutil.copy2(replayed.path("/etc/app/app.conf"), link + ".tmp")  # the same bytes and metadata, a new inode
    os.chown(link + ".tmp", 0, 1)
    os.rename(link + ".tmp", link)
    os.unlink(replayed.path("/etc/app/current"))
    os.symlink("/etc/passwd", replayed.path("/etc/app/current"))
    os.unlink(replayed.path("/etc/app/sparse.img"))
    os.mkdir(replayed.path("/etc/app/sparse.img"))
    assert drifts(replayed) == [
        "drift: /etc/app/app.conf: owner daemon, journal says root",
        "drift: /etc/app/app.conf.link: not a hard link of /etc/app/app.conf any more",
        "drift: /etc/app/app.conf.link: group daemon, journal says www",
        "drift: /etc/app/current: target /etc/passwd, journal says app.conf",
        "drift: /etc/app/sparse.img: type directory, journal says regular file",
    ]


def test_sparse_file_holes_are_checked_as_snap_stored_them(replayed):
    sparse = replayed.path("/etc/app/sparse.img")
    with open(sparse, "r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 4096)  # zeros written into a hole: the same bytes
    verify(replayed, code=0)
    with open(sparse, "r+b") as f:
        f.seek(2048)
        f.write(b"x")  # data where the snap had a hole
    assert drifts(replayed) == ["drift: /etc/app/sparse.img: content differs"]


def test_verify_never_follows_a_link_out_of_the_root(replayed, tmp_path):
    # A directory replaced by a link to a copy outside the root: reached as a chroot would, its files are gone.
    outside = tmp_path / "outside"
    shutil.copytree(replayed.path("/etc/app"), str(outside), symlinks=True)
    shutil.rmtree(replayed.path("/etc/app"))
    os.symlink(str(outside), replayed.path("/etc/app"))
    assert drifts(replayed)[:2] == ["drift: /etc/app: type symbolic link, journal says directory",
                                    "drift: /etc/app/app.conf: missing"]


def test_a_file_an_exec_removed_after_its_snap_is_drift(author, keys, host, tmp_path, busybox_root):
    # The journal's last snap says it exists: that is what verify is for.  Its odd name is printed escaped.
    src = source_tree(tmp_path, "/etc/motd\x1b[2J", "hello\n")
    author.commit(["--root", src, "snap", "/etc/motd\x1b[2J"],
                  ["exec", "--no-run", "--", "/bin/rm", "/etc/motd\x1b[2J"])
    busybox_root(host.root)
    replay(author, host, keys)
    assert drifts(host) == ["drift: /etc/motd\\x1b[2J: missing"]


def test_the_last_applied_snap_of_a_path_is_the_reference(author, keys, host, tmp_path, busybox_root):
    # Two applied snaps of a file, then a failing exec, then a pending third snap: the second is the reference.
    src = source_tree(tmp_path, "/etc/motd", "first\n")
    author.commit(["--root", src, "snap", "/etc/motd"])
    with open(os.path.join(src, "etc/motd"), "w") as f:
        f.write("second\n")
    os.chmod(os.path.join(src, "etc/motd"), 0o600)
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/false"])
    os.chmod(os.path.join(src, "etc/motd"), 0o644)
    author.commit(["--root", src, "snap", "/etc/motd"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="failed")
    verify(host, code=0)
    os.chmod(host.path("/etc/motd"), 0o644)
    assert drifts(host) == ["drift: /etc/motd: mode 0644, journal says 0600"]


def test_a_hard_link_keeps_its_content_once_a_later_snap_replaced_its_file(author, keys, host, tmp_path,
                                                                          busybox_root):
    # A later snap of /etc/a installs a new inode there; /etc/a.link keeps the first content, as it should.
    hard_link_then_its_file_replaced(author, tmp_path)
    busybox_root(host.root)
    replay(author, host, keys)
    assert open(host.path("/etc/a.link")).read() == "first\n"
    verify(host, code=0)
    with open(host.path("/etc/a.link"), "w") as f:
        f.write("third\n")
    assert drifts(host) == ["drift: /etc/a.link: content differs"]
