"""Installing a snap's files from their staged objects without a second copy: an object verified in the run
is moved into place at its last install, copied inside the kernel otherwise (another path names it, a sparse
file, another file system), and an object changed since it was verified is refused as before."""

import hashlib
import json
import os
import random
import stat
import subprocess
import sys

import pytest

from conftest import MTIME, PYTHONS, Host, error_line, extents

MiB = 1024 * 1024
OBJECTS = "/var/lib/isconf/objects"
# The oldest interpreter has neither copy_file_range (sendfile copies) and the suite's has it.
NEWEST_AND_OLDEST = sorted(set([PYTHONS[0], sys.executable]))


def content(seed, size=3 * MiB + 5):
    """Random bytes of one test, from its seed."""
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")


def source(tmp_path, files):
    """A tree to snap from: path -> bytes (or (bytes, extents) for a sparse file, the data at each offset),
    each file 0640, owned by root and group 33, with the same mtime."""
    src = str(tmp_path / "src")
    for path, data in files.items():
        full = os.path.join(src, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            if isinstance(data, tuple):
                size, pieces = data
                f.truncate(size)
                for offset, piece in pieces:
                    f.seek(offset)
                    f.write(piece)
            else:
                f.write(data)
        os.chmod(full, 0o640)
        os.chown(full, 0, 33)
        os.utime(full, ns=(MTIME, MTIME))
    return src


def snap(src, *paths):
    return ["--root", src, "snap"] + list(paths)


def shell(command):
    return ["exec", "--no-run", "--", "/bin/sh", "-c", command]


def new_host(tmp_path, server, keys, busybox_root, python=None):
    host = Host(str(tmp_path / "host"), python=python)
    busybox_root(host.root)
    host.init(server.url, keys)
    return host


def assert_installed(host, src, path):
    """The file at path on the host is the source's, its bytes, mode, owner and mtime."""
    with open(host.path(path), "rb") as f, open(os.path.join(src, path.lstrip("/")), "rb") as g:
        assert f.read() == g.read(), path
    st = os.stat(host.path(path))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o640, 0, 33, MTIME), path


def object_requests(server, sha, mark=0):
    return [line for line in server.requests()[mark:] if "/objects/" + sha in line]


def test_an_object_fetched_in_the_run_is_moved_into_place_not_copied(author, server, keys, tmp_path, busybox_root,
                                                                     seed):
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/big": data})
    author.commit(snap(src, "/srv/big"), shell("ls %s > /tmp/staged" % OBJECTS))
    host = new_host(tmp_path, server, keys, busybox_root)
    host("up", expect="ok")
    assert_installed(host, src, "/srv/big")
    # Gone from the staging area as soon as it was installed, before the end of the run prunes what was applied.
    staged = open(host.path("/tmp/staged")).read().split()
    assert sha not in staged and not any(name.startswith(".isconf-") for name in os.listdir(host.path("/srv")))


def test_an_object_staged_by_an_earlier_run_becomes_the_installed_file(author, server, keys, tmp_path, busybox_root,
                                                                      seed):
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/big": data})
    author.commit(shell("test -e /tmp/go"), snap(src, "/srv/big"))
    host = new_host(tmp_path, server, keys, busybox_root)
    host("up", expect="failed")  # the snap's object staged (rule 4), the snap not reached
    staged = os.stat(host.state("objects", sha))
    open(host.path("/tmp/go"), "w").close()
    mark = server.mark()
    host("up", expect="ok")  # hashes the staged object once before the first transaction, then moves it
    assert_installed(host, src, "/srv/big")
    installed = os.stat(host.path("/srv/big"))
    assert (installed.st_dev, installed.st_ino) == (staged.st_dev, staged.st_ino)
    assert installed.st_nlink == 1 and not os.path.exists(host.state("objects", sha))
    assert not object_requests(server, sha, mark)


def test_a_staged_object_with_another_link_is_copied_not_moved(author, server, keys, tmp_path, busybox_root, seed):
    # Moved, it would take the other name's inode into place with it, and give it the file's mode and owner.
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/big": data})
    author.commit(shell("test -e /tmp/go"), snap(src, "/srv/big"))
    host = new_host(tmp_path, server, keys, busybox_root)
    host("up", expect="failed")
    os.link(host.state("objects", sha), host.path("/tmp/other"))
    open(host.path("/tmp/go"), "w").close()
    host("up", expect="ok")
    assert_installed(host, src, "/srv/big")
    other = os.stat(host.path("/tmp/other"))
    assert other.st_ino != os.stat(host.path("/srv/big")).st_ino and stat.S_IMODE(other.st_mode) == 0o600


@pytest.mark.parametrize("python", NEWEST_AND_OLDEST, ids=lambda p: p.split("/")[-3])
def test_every_path_naming_one_object_gets_it_whole(python, author, server, keys, tmp_path, busybox_root, seed):
    # /srv/a's install is not the object's last: it stays staged for /srv/b and /srv/c (one snap), copied for
    # /srv/b, moved for /srv/c.
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/a": data, "/srv/b": data, "/srv/c": data})
    author.commit(snap(src, "/srv/a"), shell("ls %s > /tmp/between" % OBJECTS), snap(src, "/srv/b", "/srv/c"),
                  shell("ls %s > /tmp/after" % OBJECTS))
    host = new_host(tmp_path, server, keys, busybox_root, python)
    host("up", expect="ok")
    for path in ("/srv/a", "/srv/b", "/srv/c"):
        assert_installed(host, src, path)
    assert len(set(os.stat(host.path(p)).st_ino for p in ("/srv/a", "/srv/b", "/srv/c"))) == 3
    assert sha in open(host.path("/tmp/between")).read().split()
    assert sha not in open(host.path("/tmp/after")).read().split()


@pytest.mark.parametrize("python", NEWEST_AND_OLDEST, ids=lambda p: p.split("/")[-3])
def test_a_sparse_file_keeps_its_holes(python, author, server, keys, tmp_path, busybox_root, seed):
    # Its object holds its data extents back to back: each is copied to its place, the holes stay holes,
    # whether the object is another path's too (/srv/one) or at its last install (/srv/two).
    rnd = random.Random(seed)
    pieces = [(MiB, content(rnd.random(), 5000)), (5 * MiB + 123, content(rnd.random(), 70000)),
              (16 * MiB - 3, b"end")]
    src = source(tmp_path, {"/srv/one": (17 * MiB, pieces), "/srv/two": (17 * MiB, pieces)})
    author.commit(snap(src, "/srv/one", "/srv/two"))
    host = new_host(tmp_path, server, keys, busybox_root, python)
    host("up", expect="ok")
    for path in ("/srv/one", "/srv/two"):
        assert_installed(host, src, path)
        assert extents(host.path(path)) == extents(os.path.join(src, path.lstrip("/")))
        assert os.stat(host.path(path)).st_blocks * 512 < MiB


def test_an_object_changed_after_it_was_verified_is_refused_and_nothing_of_it_installed(author, server, keys, tmp_path,
                                                                                      busybox_root, seed):
    # An exec before the snap writes one byte into the staged object, verified at the start of the run: the
    # snap reads and hashes it again rather than trust it, refuses it, and the next run fetches it anew.
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/big": data})
    author.commit(shell("echo -n X | /bin/busybox dd of=%s/%s bs=1 seek=1000 conv=notrunc" % (OBJECTS, sha)),
                  snap(src, "/srv/big"))
    host = new_host(tmp_path, server, keys, busybox_root)
    damaged = host("up", expect="state")
    assert "staged object %s is damaged" % sha in error_line(damaged)
    assert os.listdir(host.path("/srv")) == [] and not os.path.exists(host.state("objects", sha))
    mark = server.mark()
    host("up", expect="ok")
    assert_installed(host, src, "/srv/big")
    assert len(object_requests(server, sha, mark)) == 1


@pytest.mark.parametrize("python", NEWEST_AND_OLDEST, ids=lambda p: p.split("/")[-3])
@pytest.mark.parametrize("mount", ["tmpfs", "bind"])
def test_an_object_staged_on_another_file_system_is_copied_into_place(mount, python, author, server, keys, tmp_path,
                                                                      busybox_root, seed):
    # A tmpfs is another file system; a bind mount of the host's own is the same one (its device) seen through
    # another mount, across which no rename goes either (EXDEV).
    data = content(seed)
    src = source(tmp_path, {"/srv/big": data})
    author.commit(snap(src, "/srv/big"))
    host = new_host(tmp_path, server, keys, busybox_root, python)
    if mount == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", host.state("objects")],
                       check=True)
    else:
        os.mkdir(str(tmp_path / "elsewhere"), 0o700)
        subprocess.run(["mount", "--bind", str(tmp_path / "elsewhere"), host.state("objects")], check=True)
    try:
        host("up", expect="ok")
    finally:
        subprocess.run(["umount", host.state("objects")], check=True)
    assert_installed(host, src, "/srv/big")


def test_a_snap_that_failed_after_moving_an_object_fetches_it_again(author, server, keys, tmp_path, busybox_root,
                                                                    seed):
    # /srv/a's object is moved into place, then /srv/b/c cannot be made (a file stands at /srv/b): the snap runs
    # again whole, its moved object no longer staged: the dry run says so, and the next run fetches it again.
    a, c = content(seed), content(seed + 1, 1000)
    sha = hashlib.sha256(a).hexdigest()
    src = source(tmp_path, {"/srv/a": a, "/srv/b/c": c})
    author.commit(snap(src, "/srv/a", "/srv/b/c"))
    host = new_host(tmp_path, server, keys, busybox_root)
    os.makedirs(host.path("/srv"))
    open(host.path("/srv/b"), "w").close()
    host("up", expect="failed")
    assert open(host.path("/srv/a"), "rb").read() == a and not os.path.exists(host.state("objects", sha))
    pending = host("up", "--dry-run", "--json", expect="pending")
    assert {o["sha"]: o["staged"] for o in json.loads(pending.out)["objects"]}[sha] is False
    os.unlink(host.path("/srv/b"))
    mark = server.mark()
    host("up", expect="ok")
    assert_installed(host, src, "/srv/a")
    assert_installed(host, src, "/srv/b/c")
    assert len(object_requests(server, sha, mark)) == 1


def test_a_repair_leaves_staged_what_a_pending_transaction_needs(author, server, keys, tmp_path, busybox_root, seed):
    # The repair of /srv/a fetches nothing: the object is staged for the snap of /srv/b, after an exec that fails;
    # it copies it, so that the snap still finds it.
    data = content(seed)
    sha = hashlib.sha256(data).hexdigest()
    src = source(tmp_path, {"/srv/a": data, "/srv/b": data})
    author.commit(snap(src, "/srv/a"))
    author.commit(shell("test -e /tmp/go"), snap(src, "/srv/b"))
    host = new_host(tmp_path, server, keys, busybox_root)
    host("up", expect="failed")
    os.unlink(host.path("/srv/a"))
    repaired = host("verify", "--repair", expect="ok")  # /srv/b, pending, is not the repair's to make
    assert "repaired: /srv/a" in repaired.out
    assert_installed(host, src, "/srv/a")
    open(host.path("/tmp/go"), "w").close()
    mark = server.mark()
    host("up", expect="ok")
    assert_installed(host, src, "/srv/b")
    assert not object_requests(server, sha, mark)
