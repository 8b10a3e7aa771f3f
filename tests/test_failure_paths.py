"""Clean failure paths: no temporary file outlives a failed write, a rename onto the same file leaves no
second link, a deep path is walked with a few descriptors, and damaged local files are state errors."""

import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import Host, agent_for_nobody, append_unknown_entry, error_line, undated

CONTENT = b"#!/bin/sh\necho set-uid\n"


def crafted_snap(author, keys, records, content=CONTENT):
    """A signed snap of records (files of content) after an exec, its object in the repository: what a
    journal can carry that no snap on this machine could capture (a name over 255 bytes)."""
    sha = hashlib.sha256(content).hexdigest()
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    os.makedirs(os.path.join(author.repo, "objects"), exist_ok=True)
    with open(os.path.join(author.repo, "objects", sha), "wb") as f:
        f.write(content)
    files = [dict({"type": "file", "mode": 0o4755, "mtime_ns": 1700000000000000000, "size": len(content),
                   "object": sha, "uid": 0, "gid": 0, "user": "root", "group": "root"}, **record)
             for record in records]
    append_unknown_entry(author, keys, kind="snap", message="", files=files)


def set_id_files(root):
    found = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(os.path.relpath(os.path.join(top, name), root))
    return found


def temporaries(directory):
    return [name for name in os.listdir(directory) if name.startswith(".isconf-")]


@pytest.mark.parametrize("case", ["a directory in the way", "a name over 255 bytes"])
def test_a_failed_rename_leaves_no_temporary_copy_and_no_set_uid_file(case, author, keys, host, busybox_root):
    busybox_root(host.root)
    name = "tool" if case == "a directory in the way" else "t" * 300
    crafted_snap(author, keys, [{"path": "/usr/local/bin/" + name}])
    if case == "a directory in the way":
        os.makedirs(host.path("/usr/local/bin/tool/inside"))
    host.init(author.repo, keys)
    host("up", expect="failed")
    assert temporaries(host.path("/usr/local/bin")) == []
    assert set_id_files(host.root) == []
    host("skip", "2", "-m", "cannot be installed here", expect="ok")
    host("up", expect="ok")
    assert temporaries(host.path("/usr/local/bin")) == []
    assert set_id_files(host.root) == []


def killed_before_its_rename(author, host):
    """What an attempt at snap 2 (crafted_snap: /usr/local/bin/tool), killed after its copy was whole and
    before its rename, leaves: the copy under its temporary name, set-uid, and a start without an end."""
    name = ".isconf-" + hashlib.sha256(b"tool").hexdigest()[:16]  # the same name at every attempt
    os.makedirs(host.path("/usr/local/bin"), exist_ok=True)
    with open(host.path("/usr/local/bin/" + name), "wb") as f:
        f.write(CONTENT)
    os.chmod(host.path("/usr/local/bin/" + name), 0o4755)
    line = author.journal().splitlines()[1]
    record = {"event": "started", "seq": 2, "id": hashlib.sha256(line).hexdigest(), "time": "2026-01-01T00:00:00Z"}
    os.makedirs(host.state(), exist_ok=True)
    with open(host.state("history"), "ab") as f:
        f.write(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    os.chmod(host.state("history"), 0o600)


def test_a_copy_a_killed_snap_left_goes_when_the_entry_is_skipped(author, keys, host, busybox_root):
    busybox_root(host.root)
    crafted_snap(author, keys, [{"path": "/usr/local/bin/tool"}])
    host.init(author.repo, keys, "--interrupted-max", "1")
    killed_before_its_rename(author, host)
    proc = host("up", expect="failed")  # halted at 2: started once without ending
    assert "interrupted_max 1" in proc.err and set_id_files(host.root) != []
    host("skip", "2", "-m", "not on this host", expect="ok")
    assert temporaries(host.path("/usr/local/bin")) == [] and set_id_files(host.root) == []


def test_a_copy_a_killed_snap_left_goes_when_the_entry_is_retracted(author, keys, host, busybox_root):
    busybox_root(host.root)
    crafted_snap(author, keys, [{"path": "/usr/local/bin/tool"}])
    host.init(author.repo, keys, "--interrupted-max", "1")
    killed_before_its_rename(author, host)
    author("lock", "-m", "retire it")
    author("retract", "2", "-m", "not wanted after all")
    author.ci()
    proc = host("up", expect="ok")
    assert "retracted by 3" in proc.out, proc.out
    assert temporaries(host.path("/usr/local/bin")) == [] and set_id_files(host.root) == []


def test_a_hard_link_onto_its_own_file_through_a_linked_directory_leaves_no_second_link(author, keys, host,
                                                                                        busybox_root):
    # /alias is a link to /srv on the host: hard link /alias/a -> /srv/a renames a link of /srv/a onto
    # /srv/a itself, which does nothing (POSIX); the temporary name must not stay as a second link.
    busybox_root(host.root)
    crafted_snap(author, keys, [{"path": "/srv/a", "mode": 0o644}])
    files = json.loads(author.journal().splitlines()[-1])["files"]
    append_unknown_entry(author, keys, kind="snap", message="", files=files + [
        {"path": "/alias/a", "type": "hardlink", "target": "/srv/a"}])
    os.makedirs(host.path("/srv"))
    os.symlink("srv", host.path("/alias"))
    host.init(author.repo, keys)
    host("up", expect="ok")
    assert os.listdir(host.path("/srv")) == ["a"]
    assert os.stat(host.path("/srv/a")).st_nlink == 1


def run_with_few_descriptors(host, *args):
    """isconf with RLIMIT_NOFILE lowered, as under a service manager's limit."""
    return host(*args, limits={resource.RLIMIT_NOFILE: 64})


DEEP = "/" + "d/" * 1100 + "file"


def remove_deep(top):
    """Remove a chain of directories named d under top, one level at a time (rmtree takes a descriptor a level)."""
    while os.path.lexists(os.path.join(top, "d")):
        deeper = os.path.join(top, "d", "d")
        if os.path.lexists(deeper):
            os.rename(deeper, os.path.join(top, "d.next"))
        for name in os.listdir(os.path.join(top, "d")):
            os.unlink(os.path.join(top, "d", name))
        os.rmdir(os.path.join(top, "d"))
        if os.path.lexists(os.path.join(top, "d.next")):
            os.rename(os.path.join(top, "d.next"), os.path.join(top, "d"))


def test_a_path_1100_directories_deep_is_walked_with_a_few_descriptors(author, keys, host, busybox_root, request):
    # One descriptor per level would need 1,100 under a limit of 64: install, then verify, then a link back up.
    busybox_root(host.root)
    crafted_snap(author, keys, [{"path": DEEP, "mode": 0o644}])
    request.addfinalizer(lambda: remove_deep(host.root))
    host.init(author.repo, keys)
    proc = run_with_few_descriptors(host, "up")
    assert proc.returncode == 0, proc.err
    with open(host.path(DEEP), "rb") as f:
        assert f.read() == CONTENT
    proc = run_with_few_descriptors(host, "verify")
    assert proc.returncode == 0 and "no drift in 1 journaled path" in proc.out, proc.out + proc.err
    # The file replaced by a link 500 levels up and down again ('..' walked with the same few descriptors).
    fd = os.open(host.root, os.O_RDONLY)
    for name in DEEP.split("/")[1:-1]:
        fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.unlink("file", dir_fd=fd)
    os.symlink("../" * 500 + "d/" * 500 + "elsewhere", "file", dir_fd=fd)
    os.close(fd)
    proc = run_with_few_descriptors(host, "verify")
    assert proc.returncode == 8 and "type symbolic link" in proc.out, proc.out + proc.err


# --- damaged local files: exit 7 and one line, never a traceback (70) ------------------------------------

LOCAL_FILES = ["/var/lib/isconf/installed", "/var/lib/isconf/last-run", "/var/lib/isconf/history",
               "/etc/isconf/isconf.conf", "/var/lib/isconf/journal", "/var/lib/isconf/head",
               "/var/lib/isconf/disabled", "/etc/isconf/allowed_signers", "/var/lib/isconf/head.sig"]
VERBS = ["up", "status", "log", "verify", "uninstall", "install"]


def numbers_as_strings(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return [numbers_as_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: numbers_as_strings(v) for k, v in value.items()}
    return value


def damaged(data, damage):
    """The bytes of a local file after damage: data is what isconf wrote there."""
    lines = data.split(b"\n")
    if damage == "garbage":
        return b"\x00\x01garbage {{{ ]]\n"
    if damage == "truncated":
        return data[:len(data) // 2]
    if damage == "a list where an object is due":
        return b"\n".join(b"[1,2]" if line.strip() else line for line in lines)
    if damage == "a string where a number is due":
        out = []
        for line in lines:
            try:
                out.append(json.dumps(numbers_as_strings(json.loads(line)), sort_keys=True,
                                      separators=(",", ":")).encode())
            except ValueError:   # the config's numbers are text: a word instead of one
                out.append(line + b"\ntimeout = thirty" if line == b"[isconf]" else line)
        return b"\n".join(out)
    if damage == "invalid UTF-8":
        return b"\xff\xfe\xc3" + data
    if damage == "a huge line":
        return data + b"7" * (2 << 20) + b"\n"
    if damage == "deep nesting":
        return b"[" * 100000 + b"\n"
    raise AssertionError(damage)


DAMAGES = ["garbage", "truncated", "a list where an object is due", "a string where a number is due",
           "invalid UTF-8", "a huge line", "deep nesting"]


@pytest.fixture(scope="module")
def damage_template(tmp_path_factory, keys):
    """A host that installed its units, applied a snap and an exec, recorded a run, then was disabled
    (the disabled record is put back only where it is the file damaged)."""
    from conftest import Author, install_busybox, source_tree
    top = tmp_path_factory.mktemp("damage")
    author = Author(str(top / "repo"), keys=keys)
    src = source_tree(top, "/etc/motd", "hello\n")
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/one"])
    host = Host(str(top / "host"))
    install_busybox(host.root)
    host.init(author.repo, keys)
    host("install", "--cron", expect="ok")
    host("up", expect="ok")
    host("disable", "-m", "maintenance", expect="ok")
    with open(host.state("disabled"), "rb") as f:
        disabled = f.read()
    host("enable", expect="ok")
    return host, disabled


# The verbs that read each file, and answer its damage with exit 7 and a line naming it.
READERS = {
    "/var/lib/isconf/installed": {"uninstall", "install"},
    "/var/lib/isconf/history": {"up", "status", "log", "verify"},
    "/etc/isconf/isconf.conf": {"up", "status", "log", "verify", "install"},
    "/var/lib/isconf/journal": {"up", "status", "log", "verify"},
    "/var/lib/isconf/head": {"up", "status", "log", "verify"},
    "/etc/isconf/allowed_signers": {"up"},
}
# Damage a file's design absorbs: what happens then is what happens without it (or exit 7 at most).
ABSORBED = {
    ("/var/lib/isconf/history", "truncated"): "a torn last record is what a power cut leaves: it is ignored",
    ("/var/lib/isconf/history", "invalid UTF-8", "up"): "up reads the history from its end back to the last done",
    ("/etc/isconf/isconf.conf", "truncated"): "a config cut short can still be one (here with a shorter URL)",
    ("/var/lib/isconf/journal", "a huge line"): "bytes past the local head's length are not the verified copy",
    ("/etc/isconf/allowed_signers", "a string where a number is due"): "not JSON: nothing changed",
}
# Other files: last-run (a damaged record reads as none: a monitor still gets the rest of the report),
# disabled (a damaged record still pauses the host: up exits 9), head.sig (one that does not verify is
# fetched again).
OTHER_CODES = {("/var/lib/isconf/disabled", "up"): 9, ("/etc/isconf/isconf.conf", "up"): 3}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("path", LOCAL_FILES)
def test_a_damaged_local_file_is_a_state_error_never_a_crash(damage_template, tmp_path, path, damage, verb):
    import shutil
    from conftest import Host
    template, disabled = damage_template
    host = Host(str(tmp_path / "host"))
    shutil.rmtree(host.root)
    shutil.copytree(template.root, host.root, symlinks=True)
    if path.endswith("/disabled"):
        data = disabled
    else:
        with open(host.path(path), "rb") as f:
            data = f.read()
    with open(host.path(path), "wb") as f:
        f.write(damaged(data, damage))
    proc = host(verb, timeout=60)
    assert "Traceback" not in proc.err and proc.returncode != 70, proc.err
    if verb in READERS.get(path, ()) and (path, damage) not in ABSORBED and (path, damage, verb) not in ABSORBED:
        assert proc.returncode == 7, proc.err
        assert os.path.basename(path) in error_line(proc)
    else:
        assert proc.returncode in {0, 7, OTHER_CODES.get((path, verb), 0)}, proc.err


@pytest.mark.parametrize("verb", [["up"], ["status"], ["skip", "1", "-m", "x"]])
def test_a_host_verb_run_without_root_says_to_run_it_as_root(verb, server, keys, host, tmp_path):
    # An admin who forgot sudo got 'Permission denied (isconf); check the disk and permissions'.
    host.init(server.url, keys)
    agent = agent_for_nobody(tmp_path)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-I", agent,
                           "--root", host.root] + verb, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=120)
    proc.err = undated(proc.stderr.decode("utf-8", "replace"))
    assert proc.returncode == 7, proc.err
    assert error_line(proc).endswith("Permission denied; run isconf as root: a host's config and state are root's") \
        or error_line(proc).endswith("Permission denied (isconf); run isconf as root: a host's config and state are "
                                     "root's"), proc.err


@pytest.mark.parametrize("field,value", [("applied", "3"), ("fetched_bytes", None), ("reason", 5),
                                         ("result", ["ok"])])
def test_a_last_run_record_with_a_field_of_the_wrong_type_reads_as_none(damage_template, tmp_path, field, value):
    # status printed the last run's numbers with %d and its reason by concatenation: exit 70 on a damaged record.
    template, _ = damage_template
    host = Host(str(tmp_path / "host"))
    shutil.rmtree(host.root)
    shutil.copytree(template.root, host.root, symlinks=True)
    with open(host.state("last-run")) as f:
        record = json.load(f)
    record[field] = value
    with open(host.state("last-run"), "w") as f:
        json.dump(record, f)
    proc = host("status", expect="ok")
    assert "last run:" not in proc.out and "applied:      seq 2" in proc.out
    assert json.loads(host("status", "--json", expect="ok").out)["last_run"] is None
