"""Local privilege boundaries: what the agent trusts on the host is root's alone, the modes of what it
and its execs make do not depend on who started it, and the journal never writes the agent's own state."""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import ISCONF, append_entry, error_line, source_tree, undated

OTHER = 1000  # a uid that is not root


def counting_host(author, keys, host, busybox_root, tmp_path=None):
    """A host that applied one exec (which appends a line to /tmp/count each time it runs); with tmp_path,
    then a published snap of /etc/motd, whose file record this returns."""
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo ran >> /tmp/count"])
    record = snap_record(author, tmp_path) if tmp_path else None
    host.init(author.repo, keys)
    host("up", expect="ok")
    return record


def applied_host(author, keys, host, busybox_root):
    """counting_host, with a second exec pending that would make /tmp/pending."""
    counting_host(author, keys, host, busybox_root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/pending"])


def fix_from(line):
    """The command an error line says to run: 'run '...''."""
    return line.split("run '", 1)[1].rsplit("'", 1)[0]


def refused_then_fixed(host, line_wanted, verbs=("up",)):
    """Each verb exits 7 with line_wanted, nothing is applied; the fix the line gives makes 'up' work."""
    for verb in verbs:
        proc = host(*verb.split(), expect="state")
        assert error_line(proc) == "isconf: error: " + line_wanted
    assert not os.path.exists(host.path("/tmp/pending"))
    subprocess.run(["sh", "-c", fix_from(line_wanted)], check=True)
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/pending"))


CONFIG_VERBS = ("up", "up --dry-run", "status", "log", "verify", "disable -m why", "enable", "migrate canary",
                "install --sysv", "init --force %s --branch web --insecure" % os.getcwd())
STATE_VERBS = CONFIG_VERBS[:-1] + ("skip 2 -m why", "uninstall")


def test_a_world_writable_etc_isconf_is_refused_by_every_verb_that_trusts_it(author, keys, host, busybox_root):
    # Anyone could rename his own allowed_signers into place, and 'up' would run what his key signed.
    applied_host(author, keys, host, busybox_root)
    etc = host.path("/etc/isconf")
    os.chmod(etc, 0o777)
    refused_then_fixed(host, "%s is writable by group and others (owner root, mode 0777): run 'chmod go-w %s'"
                       % (etc, etc), CONFIG_VERBS)


def test_a_state_directory_owned_by_another_user_is_refused(author, keys, host, busybox_root):
    # Its owner could edit the history so that a pending fix counts as done.
    applied_host(author, keys, host, busybox_root)
    state = host.state()
    os.chown(state, OTHER, 0)
    refused_then_fixed(host, "%s is owned by uid %d, not root (owner uid %d, mode 0700): run 'chown root %s'"
                       % (state, OTHER, OTHER, state), STATE_VERBS)


def test_a_file_in_the_state_owned_by_another_user_is_refused(author, keys, host, busybox_root):
    applied_host(author, keys, host, busybox_root)
    history = host.state("history")
    os.chown(history, OTHER, OTHER)
    os.chmod(history, 0o664)
    refused_then_fixed(host, "%s is owned by uid %d, not root and writable by group (owner uid %d, mode 0664): "
                       "run 'chown root %s && chmod go-w %s'" % (history, OTHER, OTHER, history, history),
                       ("up", "status"))


@pytest.mark.parametrize("sub", ["objects", "logs"])
def test_a_subdirectory_of_the_state_others_can_write_is_refused(author, keys, host, busybox_root, sub):
    applied_host(author, keys, host, busybox_root)
    path = host.state(sub)
    os.chmod(path, 0o777)
    refused_then_fixed(host, "%s is writable by group and others (owner root, mode 0777): run 'chmod go-w %s'"
                       % (path, path))


def test_a_config_named_by_config_in_a_directory_others_can_write_is_refused(author, keys, host, busybox_root,
                                                                           tmp_path):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/pending"])
    conf_dir = str(tmp_path / "conf")
    config = os.path.join(conf_dir, "isconf.conf")
    host("--config", config, "init", author.repo, "--branch", "web", "--signers", keys.signers, expect="ok")
    os.chmod(conf_dir, 0o777)
    proc = host("--config", config, "up", expect="state")
    assert error_line(proc) == ("isconf: error: %s is writable by group and others (owner root, mode 0777): run "
                                "'chmod go-w %s'" % (conf_dir, conf_dir))
    os.chmod(conf_dir, 0o755)
    host("--config", config, "up", expect="ok")


def test_a_group_writable_root_directory_is_refused(author, keys, host, busybox_root):
    applied_host(author, keys, host, busybox_root)
    os.chmod(host.root, 0o775)
    refused_then_fixed(host, "%s is writable by group (owner root, mode 0775): run 'chmod go-w %s'"
                       % (host.root, host.root), ("up", "status"))


def test_a_writable_directory_on_the_way_to_the_trusted_keys_is_refused(author, keys, host, busybox_root):
    applied_host(author, keys, host, busybox_root)
    etc = host.path("/etc")
    os.chmod(etc, 0o757)
    refused_then_fixed(host, "%s is writable by others (owner root, mode 0757): run 'chmod go-w %s'" % (etc, etc))


@pytest.mark.parametrize("what", ["/usr/local/sbin/isconf", "/usr/local/sbin"])
def test_an_agent_file_others_can_change_is_refused_by_the_verbs_that_run_it(author, keys, host, busybox_root,
                                                                           what):
    # Whoever can change the file the units run has root at the next boot.
    applied_host(author, keys, host, busybox_root)
    host("install", "--sysv", expect="ok")
    path = host.path(what)
    mode = stat.S_IMODE(os.stat(path).st_mode) | 0o002
    os.chmod(path, mode)
    refused_then_fixed(host, "%s is writable by others (owner root, mode %04o): run 'chmod go-w %s'"
                       % (path, mode, path), ("up", "install --sysv"))


@pytest.mark.parametrize("what", ["/opt/isconf/isconf.py", "/opt/isconf"])
def test_an_agent_file_linked_from_the_units_path_is_checked_where_it_is(author, keys, host, busybox_root, what):
    applied_host(author, keys, host, busybox_root)
    os.makedirs(host.path("/opt/isconf"))
    os.makedirs(host.path("/usr/local/sbin"))
    with open(ISCONF, "rb") as f, open(host.path("/opt/isconf/isconf.py"), "wb") as out:
        out.write(f.read())
    os.chmod(host.path("/opt/isconf/isconf.py"), 0o755)
    os.symlink("/opt/isconf/isconf.py", host.path("/usr/local/sbin/isconf"))
    host("status", expect="ok")
    path = host.path(what)
    mode = stat.S_IMODE(os.stat(path).st_mode) | 0o020
    os.chmod(path, mode)
    refused_then_fixed(host, "%s is writable by group (owner root, mode %04o): run 'chmod go-w %s'"
                       % (path, mode, path))


def test_the_state_owned_by_another_user_is_not_given_its_mode_back_by_up(author, keys, host, busybox_root):
    # The agent used to fix the mode of its state directory and keep using it whoever owned it.
    applied_host(author, keys, host, busybox_root)
    os.chown(host.state(), OTHER, 0)
    os.chmod(host.state(), 0o755)
    host("up", expect="state")
    st = os.stat(host.state())
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (OTHER, 0o755)


def run_with_umask(umask, *args):
    """isconf started by a caller whose umask is umask."""
    proc = subprocess.run([sys.executable, "-I", ISCONF] + [str(a) for a in args],
                          preexec_fn=lambda: os.umask(umask), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})
    proc.err = undated(proc.stderr.decode("utf-8", "replace"))
    return proc


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_under_a_umask_077_caller_directories_are_0755_and_an_execs_files_0644(author, keys, host, busybox_root):
    busybox_root(host.root)
    os.rmdir(host.path("/tmp"))
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "mkdir /tmp && touch /tmp/made && mkdir /tmp/dir"])
    for args in (["init", author.repo, "--branch", "web", "--signers", keys.signers], ["up"]):
        proc = run_with_umask(0o077, "--root", host.root, *args)
        assert proc.returncode == 0, proc.err
    for made in ("/var", "/var/lib", "/etc/isconf"):
        assert mode(host.path(made)) == 0o755, made
    assert (mode(host.path("/tmp")), mode(host.path("/tmp/made")), mode(host.path("/tmp/dir"))) == (0o755, 0o644,
                                                                                                   0o755)
    assert mode(host.state()) == 0o700 and mode(host.path("/etc/isconf/isconf.conf")) == 0o600


def test_exec_umask_in_the_config_is_the_umask_execs_run_with(author, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "touch /tmp/made && mkdir /tmp/dir"])
    host.init(author.repo, keys, "--exec-umask", "027")
    with open(host.path("/etc/isconf/isconf.conf")) as f:
        assert "exec_umask = 027\n" in f.read()
    proc = run_with_umask(0o000, "--root", host.root, "up")
    assert proc.returncode == 0, proc.err
    assert (mode(host.path("/tmp/made")), mode(host.path("/tmp/dir"))) == (0o640, 0o750)


def test_an_exec_run_at_author_time_on_the_reference_host_takes_its_exec_umask(author, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(author.repo, keys, "--exec-umask", "077")
    host("up", expect="ok")
    author("--root", host.root, "lock", "-m", "a private file")
    author("--root", host.root, "exec", "--", "/bin/touch", "/tmp/private")
    assert mode(host.path("/tmp/private")) == 0o600


@pytest.mark.parametrize("value", ["8", "1000", "0o22", "u=rwx", "-022", ""])
def test_init_refuses_an_exec_umask_that_is_not_octal_up_to_777(keys, host, tmp_path, value):
    proc = host("init", str(tmp_path / "repo"), "--branch", "web", "--signers", keys.signers, "--exec-umask",
                value, expect="usage")
    assert "--exec-umask %r must be a umask in octal, 000 to 777" % value in error_line(proc)


# --- the journal never writes the agent's own state -------------------------------------------------------


def append_signed(author, keys, **fields):
    """Append an entry to the branch and sign the new head with a trusted key: what a key holder could publish
    whatever the author verbs refuse."""
    append_entry(author, **fields)
    os.unlink(author.path("head.sig"))
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", author.path("head")],
                   check=True, stdin=subprocess.DEVNULL)


def snap_record(author, tmp_path):
    """Publish a snap of /etc/motd; its file record (its object is in the repository)."""
    author.commit(["--root", source_tree(tmp_path, "/etc/motd", "welcome\n"), "snap", "/etc/motd"])
    last = author.journal().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return json.loads(last)["files"][0]


@pytest.mark.parametrize("path,link", [
    ("/var/lib/isconf/history", None),
    ("/var/lib/isconf", None),
    ("/var/lib/isconf/objects/x", None),
    ("/srv/state/history", ("/srv/state", "../var/lib/isconf")),
    ("/srv/state/history", ("/srv/state", "/var/lib/isconf")),
    ("/srv/lib/isconf/last-run", ("/srv/lib", "/var/lib")),
])
def test_a_signed_snap_into_the_state_directory_is_refused_before_anything_applies(author, keys, host, busybox_root,
                                                                                    tmp_path, path, link):
    # Attack: a snap of the history made the agent forget what it applied: transaction 1 ran again.
    record = counting_host(author, keys, host, busybox_root, tmp_path)
    if link:  # made on the host, not by the journal
        os.makedirs(host.path("/srv"), exist_ok=True)
        os.symlink(link[1], host.path(link[0]))
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/pending"])
    append_signed(author, keys, kind="snap", files=[dict(record, path=path)], message="write the history")
    before = host.snapshot()
    proc = host("up", expect="refused")
    line = error_line(proc)
    assert path in line and ("agent's own state" in line), line
    assert host.snapshot() == before  # nothing applied, nothing staged, the history as it was
    host("status", expect="ok")
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"


@pytest.mark.parametrize("bound,path,kind", [
    ("/var/lib/isconf", "/mnt/state/history", "file"),
    ("/var/lib/isconf", "/mnt/state/logs/x", "file"),
    ("/var/lib/isconf", "/mnt/state", "dir"),
    ("/var", "/mnt/state/lib/isconf/last-run", "file"),
])
def test_a_signed_snap_into_the_state_directory_through_a_bind_mount_is_refused(author, keys, host, busybox_root,
                                                                               tmp_path, bound, path, kind):
    # Attack: the state directory (or /var) bind-mounted at /mnt/state on the host: no name leads into the state,
    # the directory's device and inode do.  The snap replaced the history and transaction 1 ran again.
    record = counting_host(author, keys, host, busybox_root, tmp_path)
    os.makedirs(host.path("/mnt/state"))
    subprocess.run(["mount", "--bind", host.path(bound), host.path("/mnt/state")], check=True)
    try:
        if kind == "dir":
            record = {"uid": 0, "gid": 0, "user": "root", "group": "root", "mode": 0o777}
        append_signed(author, keys, kind="snap", files=[dict(record, path=path, type=kind)], message="write it")

        def snapshot():  # but for the record of the run, which the refused run writes (seen twice here)
            return {p: seen for p, seen in host.snapshot().items() if not p.endswith("/last-run")}
        before = snapshot()
        proc = host("up", expect="refused")
        assert "entry 3 snaps %s, which leads into this host's state directory" % path in error_line(proc)
        assert snapshot() == before
        host("status", expect="ok")
    finally:
        subprocess.run(["umount", host.path("/mnt/state")], check=True)
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"
    assert stat.S_IMODE(os.stat(host.state()).st_mode) == 0o700


@pytest.mark.parametrize("path", ["/var/lib/isconf", "/var/lib/isconf/history", "/var/lib/isconf/logs/x"])
def test_a_snap_record_naming_the_state_directory_is_refused_wherever_it_is_checked(isconf, path):
    record = {"path": path, "type": "dir", "uid": 0, "gid": 0, "user": "root", "group": "root", "mode": 0o755}
    with pytest.raises(isconf.Refused, match="the agent's own state, which no journal entry may write"):
        isconf.FileType.check_record(record, {}, "entry 2")
    isconf.FileType.check_record(dict(record, path="/var/lib/isconf2"), {}, "entry 2")


@pytest.mark.parametrize("real,links,snapped,kind", [
    ("/data/var", [("/var", "data/var")], "/var", "dir"),
    ("/data/var", [("/var", "data/var")], "/var", "symlink"),
    ("/mnt/data/var", [("/var", "/data/var"), ("/data", "mnt/data")], "/data", "dir"),
])
def test_a_snap_replacing_a_link_on_the_way_to_the_state_is_refused(author, keys, host, busybox_root, real, links,
                                                                    snapped, kind):
    # On a target whose /var is a link, a snap of /var would leave the state behind: a new, empty one.
    busybox_root(host.root)
    os.makedirs(host.path(real))
    for link, target in links:
        os.symlink(target, host.path(link))
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo ran >> /tmp/count"])
    host.init(author.repo, keys)
    host("up", expect="ok")
    state = real.lstrip("/") + "/lib/isconf"
    assert os.path.isfile(host.path(state + "/history"))
    owner = {"uid": 0, "gid": 0, "user": "root", "group": "root"}
    record = dict(owner, mode=0o755) if kind == "dir" else dict(owner, target="/srv", mtime_ns=0)
    append_signed(author, keys, kind="snap", files=[dict(record, path=snapped, type=kind)], message="move it")

    def snapshot():  # but for the record of the run, which the refused run writes
        return {path: seen for path, seen in host.snapshot().items() if path != state + "/last-run"}
    before = snapshot()
    proc = host("up", expect="refused")
    assert "entry 2 snaps %s, which leads into this host's state directory" % snapped in error_line(proc)
    assert snapshot() == before


@pytest.mark.parametrize("target,said", [
    ("/var/lib/isconf", "/srv/state/history leads into this host's state directory"),
    # '..' below a directory that does not exist does not exist, for the kernel and for the walk that installs
    ("missing/../var/lib/isconf", "cannot install /srv/state/history: No such file or directory"),
])
def test_a_snap_through_a_link_an_earlier_transaction_made_fails_and_leaves_the_state_alone(author, keys, host,
                                                                                          busybox_root, tmp_path,
                                                                                          target, said):
    # Verification sees no link yet; the first snap makes it; the second must not write through it.
    counting_host(author, keys, host, busybox_root)
    links = os.path.join(str(tmp_path), "links")
    os.makedirs(os.path.join(links, "srv"))
    os.symlink(target, os.path.join(links, "srv/state"))
    author.commit(["--root", links, "snap", "/srv/state"])
    author.commit(["--root", source_tree(tmp_path, "/srv/state/history", "forgotten\n"), "snap",
                   "/srv/state/history"])
    with open(host.state("history"), "rb") as f:
        history = f.read()
    proc = host("up", expect="failed")
    assert said in error_line(proc)
    with open(host.state("history"), "rb") as f:
        assert f.read().startswith(history)  # only appended to: the snap's start and its failure
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"
    assert host.status()["failed"]["seq"] == 3


@pytest.mark.parametrize("target", ["/var/lib/isconf", "../var/lib/isconf", "missing/../var/lib/isconf"])
def test_a_snap_through_a_link_the_same_snap_installs_leaves_the_state_alone(author, keys, host, busybox_root,
                                                                             tmp_path, target):
    # Attack: one signed snap holding a link /x to the state directory, then a file /x/history: every check of
    # the entry ran before its link existed, and the history was replaced.
    record = counting_host(author, keys, host, busybox_root, tmp_path)
    link = {"path": "/x", "type": "symlink", "uid": 0, "gid": 0, "user": "root", "group": "root", "target": target,
            "mtime_ns": 0}
    append_signed(author, keys, kind="snap", files=[link, dict(record, path="/x/history")], message="through it")
    before = host.snapshot()
    proc = host("up", expect="refused")
    assert "entry 3 snaps /x/history, which leads into this host's state directory" in error_line(proc)
    assert host.snapshot() == before  # nothing applied: not even the link
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"


def test_a_link_a_snap_installed_before_a_path_through_it_fails_that_snap_and_leaves_the_state_alone(
        author, keys, host, busybox_root, tmp_path):
    # What a journal check cannot see from names (here a link to a '..' after a link on the disk, which the kernel
    # takes from where that link leads) its transaction checks just before each record is installed, on the disk
    # as the records before it left it.
    record = counting_host(author, keys, host, busybox_root, tmp_path)
    os.makedirs(host.path("/srv"))
    os.symlink("/var/lib/isconf/logs", host.path("/srv/a"))   # by name /srv/a/.. is /srv; the kernel's is the state
    link = {"path": "/y", "type": "symlink", "uid": 0, "gid": 0, "user": "root", "group": "root",
            "target": "/srv/a/..", "mtime_ns": 0}
    append_signed(author, keys, kind="snap", files=[link, dict(record, path="/y/history")],
                  message="a link, then through it")
    with open(host.state("history"), "rb") as f:
        history = f.read()
    proc = host("up", expect="failed")
    assert "/y/history leads into this host's state directory through a link" in error_line(proc)
    with open(host.state("history"), "rb") as f:
        assert f.read().startswith(history)  # only appended to: the snap's start and its failure
    assert host.status()["failed"]["seq"] == 3
    with open(host.path("/tmp/count")) as f:
        assert f.read() == "ran\n"


@pytest.mark.parametrize("path,args", [
    ("/var/lib/isconf/history", []),
    ("/var/lib/isconf", []),
    ("/var/lib", ["-r"]),
])
def test_author_snap_of_the_state_directory_is_refused(author, tmp_path, path, args):
    src = source_tree(tmp_path, "/var/lib/isconf/history", "x\n")
    author("lock", "-m", "try")
    proc = author("--root", src, "snap", *(args + [path]), expect="usage")
    line = error_line(proc)
    assert "leads into the agent's state directory (/var/lib/isconf), which no journal entry may write" in line, line
    if args:
        assert "(--exclude /var/lib/isconf)" in line
        author("--root", src, "snap", "-r", "--exclude", "/var/lib/isconf", path)


def test_author_snap_through_a_link_into_the_reference_hosts_state_is_refused(author, tmp_path):
    src = source_tree(tmp_path, "/var/lib/isconf/history", "x\n")
    os.makedirs(os.path.join(src, "srv"))
    os.symlink("/var/lib/isconf", os.path.join(src, "srv/state"))
    author("lock", "-m", "try")
    proc = author("--root", src, "snap", "/srv/state/history", expect="usage")
    assert "/srv/state/history leads into the agent's state directory" in error_line(proc)


@pytest.mark.parametrize("path,mode,user,refused", [
    ("/etc/isconf/allowed_signers", 0o666, "root", True),
    ("/etc/isconf/isconf.conf", 0o600, "daemon", True),
    ("/etc/isconf", 0o775, "root", True),
    ("/etc", 0o757, "root", True),
    ("/usr/local/sbin/isconf", 0o775, "root", True),
    ("/usr/local/sbin", 0o755, "staff", True),
    ("/var/lib", 0o777, "root", True),
    ("/", 0o775, "root", True),
    ("/etc/isconf/allowed_signers", 0o644, "root", False),
    ("/usr/local/sbin/isconf", 0o755, "root", False),
    ("/etc/motd", 0o666, "daemon", False),
    ("/usr/local/bin", 0o777, "staff", False),
    ("/etc/isconf/allowed_signers", 0o644, "0", False),
])
def test_a_snap_leaving_the_hosts_own_files_open_to_others_is_refused(isconf, path, mode, user, refused):
    # Applied, it would lock the host out of every later run (exit 7), the entry that could repair it included.
    kind = "dir" if path in ("/", "/etc", "/etc/isconf", "/usr/local/sbin", "/var/lib", "/usr/local/bin") else "file"
    record = {"path": path, "type": "dir", "uid": 0, "gid": 0, "user": user, "group": "root", "mode": mode}
    if kind == "file":
        record = dict(record, type="file", mtime_ns=0, size=0, object=isconf.sha256_hex(b""))
    if refused:
        with pytest.raises(isconf.Refused, match="the agent refuses to run while it is not root's alone"):
            isconf.FileType.check_record(record, {}, "entry 2")
    else:
        isconf.FileType.check_record(record, {}, "entry 2")


def test_a_signed_snap_opening_the_trusted_keys_to_others_is_refused_before_anything_applies(author, keys, host,
                                                                                            busybox_root, tmp_path):
    record = counting_host(author, keys, host, busybox_root, tmp_path)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/pending"])
    append_signed(author, keys, kind="snap", message="open the keys",
                  files=[dict(record, path="/etc/isconf/allowed_signers", mode=0o666)])
    before = host.snapshot()
    line = error_line(host("up", expect="refused"))
    assert "/etc/isconf/allowed_signers would be writable by group or others (mode 0666)" in line, line
    assert host.snapshot() == before
    assert not os.path.exists(host.path("/tmp/pending"))
