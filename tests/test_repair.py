"""verify --repair: drifted paths put back exactly as the journal last made them, and the drift in the metrics."""

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import (AGENT, AUTHOR, PYTHONS, Host, build, error_line, extents, hard_link_then_its_file_replaced,
                      interpreter_version, make_source, metric, put, source_tree, undated)

SNAPPED = ("/etc/app", "/etc/app/app.conf", "/etc/app/app.conf.link", "/etc/app/current", "/etc/app/sparse.img")


@pytest.fixture
def replayed(author, tmp_path, busybox_root, monitored):
    """A host that replayed a snap of every kind of file from a mirror it keeps (pruned objects come from there),
    with a metrics file."""
    src = str(tmp_path / "src")
    make_source(src, busybox_root)
    author.commit(["--root", src, "snap"] + list(SNAPPED))
    monitored("up", expect="ok")
    return monitored


def look(host, paths=SNAPPED):
    """What a snap records of each path, as the disk has it: type, mode, owner, group, link target, content,
    data extents, the mtime of what is not a directory, and which paths share an inode."""
    seen, inodes = {}, {}
    for path in paths:
        full = host.path(path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            seen[path] = None
            continue
        item = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
        if stat.S_ISLNK(st.st_mode):
            item += [os.readlink(full), st.st_mtime_ns]
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                item += [f.read(), extents(full), st.st_mtime_ns]
        item.append(inodes.setdefault((st.st_dev, st.st_ino), path))
        seen[path] = item
    return seen


def verify(host, *args, code=0):
    proc = host("verify", *args)
    assert proc.returncode == code, proc.out + proc.err
    return proc


def drifted(host):
    return sorted(set(line.split(": ")[1] for line in verify(host, code=8).out.splitlines()
                      if line.startswith("drift: ")))


def events(host, kind="repaired"):
    with open(host.state("history")) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


def rewrite_content(host):
    conf = host.path("/etc/app/app.conf")
    st = os.stat(conf)
    with open(conf, "r+b") as f:
        f.write(b"L")  # the same size and mtime: only the hash tells
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))


def change_mode(host):
    os.chmod(host.path("/etc/app"), 0o755)
    os.chmod(host.path("/etc/app/app.conf"), 0o666)


def change_owner(host):
    os.chown(host.path("/etc/app/app.conf"), 1, 1)


def retarget_link(host):
    os.unlink(host.path("/etc/app/current"))
    os.symlink("/etc/passwd", host.path("/etc/app/current"))


def break_hard_link(host):
    link = host.path("/etc/app/app.conf.link")
    shutil.copy2(host.path("/etc/app/app.conf"), link + ".tmp")
    os.rename(link + ".tmp", link)


def change_type(host):
    os.unlink(host.path("/etc/app/sparse.img"))
    os.mkdir(host.path("/etc/app/sparse.img"))  # empty: a repair may remove it
    os.unlink(host.path("/etc/app/current"))
    with open(host.path("/etc/app/current"), "w") as f:
        f.write("app.conf")


def delete_files(host):
    os.unlink(host.path("/etc/app/sparse.img"))
    os.unlink(host.path("/etc/app/app.conf"))


def delete_directory(host):
    shutil.rmtree(host.path("/etc/app"))


DRIFTS = [  # (how, the paths verify finds drifted, the paths repair installs again)
    (rewrite_content, ["/etc/app/app.conf", "/etc/app/app.conf.link"], None),
    (change_mode, ["/etc/app", "/etc/app/app.conf", "/etc/app/app.conf.link"], None),
    (change_owner, ["/etc/app/app.conf", "/etc/app/app.conf.link"], None),
    (retarget_link, ["/etc/app/current"], None),
    (break_hard_link, ["/etc/app/app.conf.link"], None),
    (change_type, ["/etc/app/current", "/etc/app/sparse.img"], None),
    # The link keeps the old inode, no drift; the file's new one takes the link along.
    (delete_files, ["/etc/app/app.conf", "/etc/app/sparse.img"],
     ["/etc/app/app.conf", "/etc/app/app.conf.link", "/etc/app/sparse.img"]),
    (delete_directory, list(SNAPPED), None),
]


@pytest.mark.parametrize("drift, paths, repaired", DRIFTS, ids=[d.__name__ for d, _, _ in DRIFTS])
def test_each_drift_is_put_back_exactly_as_the_journal_made_it(replayed, drift, paths, repaired):
    host = replayed
    before = look(host)
    drift(host)
    assert drifted(host) == paths
    proc = verify(host, "--repair")
    paths = repaired or paths
    assert sorted(l[len("repaired: "):] for l in proc.out.splitlines() if l.startswith("repaired: ")) == paths
    assert "no drift in 5 journaled paths" in proc.out
    assert look(host) == before  # content, extents, mode, owner, group, target, mtime, type, inodes shared
    verify(host)
    assert [(e["seq"], e["count"], e["paths"]) for e in events(host)] == [(1, len(paths), paths)]
    assert not os.listdir(host.state("objects"))  # what was fetched for the repair alone is pruned again


@pytest.mark.parametrize("python", sorted({PYTHONS[0], PYTHONS[-1]}), ids=lambda p: "%d.%d" % interpreter_version(p)[:2])
def test_a_repair_runs_under_the_oldest_and_newest_python(replayed, python):
    host = Host(replayed.root, python=python)
    before = look(host)
    delete_directory(host)
    verify(host, "--repair")
    assert look(host) == before


def test_a_path_filter_repairs_those_paths_alone(replayed):
    host = replayed
    retarget_link(host)
    change_mode(host)
    proc = verify(host, "--repair", "/etc/app/current", "/etc/app", code=0)
    assert [l for l in proc.out.splitlines() if l.startswith("repaired: ")] == ["repaired: /etc/app",
                                                                               "repaired: /etc/app/current"]
    assert "2 repaired, 0 not repaired; 2 drifted in 5 journaled paths" in proc.out
    assert drifted(host) == ["/etc/app/app.conf", "/etc/app/app.conf.link"]
    assert os.readlink(host.path("/etc/app/current")) == "app.conf"


def test_a_file_repaired_alone_keeps_its_hard_link(replayed):
    # A new inode at the file: its link is made again to it, or the repair would break it.
    host = replayed
    change_owner(host)
    proc = verify(host, "--repair", "/etc/app/app.conf")
    assert "repaired: /etc/app/app.conf.link" in proc.out
    verify(host)
    st, link = os.stat(host.path("/etc/app/app.conf")), os.stat(host.path("/etc/app/app.conf.link"))
    assert (st.st_ino, st.st_nlink) == (link.st_ino, 2)


def test_a_hard_link_repaired_alone_takes_its_drifted_file_along(replayed):
    # A link is made to its file: the file is put back first, or the link would share its drift.
    host = replayed
    rewrite_content(host)
    change_owner(host)
    proc = verify(host, "--repair", "/etc/app/app.conf.link")
    assert [l for l in proc.out.splitlines() if l.startswith("repaired: ")] == ["repaired: /etc/app/app.conf",
                                                                               "repaired: /etc/app/app.conf.link"]
    verify(host)


def test_an_undrifted_path_asked_for_is_left_and_exits_0(replayed):
    host = replayed
    retarget_link(host)
    proc = verify(host, "--repair", "/etc/app/app.conf")
    assert "0 repaired, 0 not repaired; 1 drifted" in proc.out
    assert drifted(host) == ["/etc/app/current"] and events(host) == []


def test_a_pruned_object_is_fetched_and_verified(replayed, server):
    host = replayed
    assert not os.listdir(host.state("objects"))  # up prunes what it applied
    sha = json.load(open(host.state("journal")))["files"][1]["object"]
    mark = server.mark()
    delete_files(host)
    verify(host, "--repair")
    fetched = {r.split("/objects/")[1].split()[0] for r in server.requests()[mark:] if "/objects/" in r}
    assert len(fetched) == 2 and sha in fetched, fetched   # the two it needs (a request a busy machine retried: once)
    assert not any("/head" in r or "/journal" in r for r in server.requests()[mark:])  # the local journal is the reference


def test_a_staged_object_is_used_without_the_network(replayed, author, server):
    host = replayed
    record = json.load(open(host.state("journal")))["files"][1]
    shutil.copy(os.path.join(author.repo, "objects", record["object"]), host.state("objects", record["object"]))
    server.stop()
    os.unlink(host.path("/etc/app/app.conf"))
    os.unlink(host.path("/etc/app/app.conf.link"))
    verify(host, "--repair")
    assert open(host.path("/etc/app/app.conf")).read() == "listen 8080\n"


def test_a_damaged_staged_object_is_not_used(replayed, author, server):
    # Its hash is checked first: damaged, it is removed and fetched again; with no mirror, nothing is installed.
    host = replayed
    record = json.load(open(host.state("journal")))["files"][1]
    with open(host.state("objects", record["object"]), "w") as f:
        f.write("LISTEN 8080\n")
    server.stop()
    os.unlink(host.path("/etc/app/app.conf"))
    proc = verify(host, "--repair", code=3)
    assert "is damaged (it changed since it was staged); fetching it again" in proc.err
    assert "no mirror could be reached" in error_line(proc)
    assert not os.path.exists(host.path("/etc/app/app.conf")) and events(host) == []


def test_a_mirror_serving_a_wrong_object_is_refused_and_nothing_installed(replayed, author):
    host = replayed
    sha = json.load(open(host.state("journal")))["files"][1]["object"]
    with open(os.path.join(author.repo, "objects", sha), "w") as f:
        f.write("LISTEN 8080\n")  # the same size, another hash
    delete_files(host)
    before = look(host)
    proc = verify(host, "--repair", code=4)
    assert "does not match the signed journal" in error_line(proc)
    assert look(host) == before and events(host) == []
    assert not os.listdir(host.state("objects"))  # no .part, nothing staged
    assert drifted(host) == ["/etc/app/app.conf", "/etc/app/sparse.img"]


def test_paths_an_exec_wrote_are_out_of_reach(author, keys, host, tmp_path, busybox_root):
    # /etc/motd: snapped, then removed by an exec; /etc/generated: written by an exec alone.
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/rm", "/etc/motd"],
                  ["exec", "--no-run", "--", "/bin/sh", "-c", "echo x > /etc/generated"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    proc = verify(host, "--repair", code=8)
    assert ("not repaired: /etc/motd: exec 2, applied after its snap (seq 1), names it: the journal may last have "
            "changed it there, out of repair's reach") in proc.out
    assert not os.path.exists(host.path("/etc/motd")) and events(host) == []
    proc = verify(host, "--repair", "/etc/generated", code=8)
    assert ("not repaired: /etc/generated: no snap this host applied records it (an exec's work, or not the "
            "journal's): out of repair's reach") in proc.out
    assert open(host.path("/etc/generated")).read() == "x\n"


def test_a_repair_is_shown_by_log_and_status(replayed):
    host = replayed
    retarget_link(host)
    verify(host, code=8)
    assert "1 of 5 journaled paths drifted: run 'isconf verify --repair'" in host("status").out
    verify(host, "--repair")
    out = host("status").out
    assert "no drift in 5 journaled paths" in out
    assert [l for l in out.splitlines() if l.startswith("repaired:")] == [
        "repaired:     %s by alice@example: /etc/app/current (1 path) from seq 1" % events(host)[0]["time"]]
    report = json.loads(host("status", "--json").out)
    assert [(r["seq"], r["paths"], r["count"], r["who"]) for r in report["repaired"]] == [
        (1, ["/etc/app/current"], 1, "alice@example")]
    assert (report["verify"]["drift_paths"], report["verify"]["paths"]) == (0, 5)
    log = host("log").out
    assert "             repaired %s by alice@example: /etc/app/current (1 path)" % events(host)[0]["time"] in log
    entry = json.loads(host("log", "--json").out)[0]
    assert [r["paths"] for r in entry["repaired"]] == [["/etc/app/current"]]


def test_the_metrics_carry_the_drift_of_the_last_verify(replayed):
    host = replayed
    assert metric(host, "isconf_drift_paths") == 0  # never verified
    change_owner(host)
    retarget_link(host)
    verify(host, code=8)
    assert metric(host, "isconf_drift_paths") == 3
    verify(host, "--repair", "/etc/app/current")
    assert metric(host, "isconf_drift_paths") == 2
    verify(host, "--repair")
    assert metric(host, "isconf_drift_paths") == 0


def test_verify_ends_with_a_hint_at_repair(replayed):
    host = replayed
    verify(host)
    assert "--repair" not in verify(host).out
    retarget_link(host)
    assert verify(host, code=8).out.splitlines()[-1] == (
        "isconf: 'isconf verify --repair [PATH...]' puts them back as the journal last made them")
    assert json.loads(verify(host, "--json", code=8).out)[0]["path"] == "/etc/app/current"  # JSON alone


def test_a_disabled_host_is_not_repaired(replayed):
    host = replayed
    host("disable", "-m", "disk swap", expect="ok")
    retarget_link(host)
    proc = verify(host, "--repair", code=9)
    assert "nothing is repaired until 'isconf enable'" in error_line(proc)
    assert os.readlink(host.path("/etc/app/current")) == "/etc/passwd"
    host("enable", expect="ok")
    verify(host, "--repair")


def test_a_busy_host_is_not_repaired(replayed):
    host = replayed
    retarget_link(host)
    with open(host.state("lock"), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        verify(host, "--repair", code=6)
    assert os.readlink(host.path("/etc/app/current")) == "/etc/passwd"


def test_a_transaction_that_never_ended_is_finished_first(replayed):
    host = replayed
    done = events(host, "done")[-1]
    with open(host.state("history"), "a") as f:
        f.write(json.dumps(dict(done, event="started"), sort_keys=True, separators=(",", ":")) + "\n")
    retarget_link(host)
    proc = verify(host, "--repair", code=7)
    assert "run 'isconf up' to finish it, then repair" in error_line(proc)
    assert json.loads(host("status", "--json").out)["state"] == "interrupted"


def test_a_directory_holding_files_is_not_removed(replayed):
    host = replayed
    os.unlink(host.path("/etc/app/sparse.img"))
    os.mkdir(host.path("/etc/app/sparse.img"))
    put = host.path("/etc/app/sparse.img/keep")
    open(put, "w").close()
    proc = verify(host, "--repair", code=8)
    assert "not repaired: /etc/app/sparse.img: cannot install it: a directory holding files" in proc.out
    assert os.path.exists(put)


@pytest.mark.parametrize("args, wanted", [
    (["/etc/app"], "PATH names what --repair puts back"),
    (["--repair", "--json"], "--json is for 'verify' alone"),
    (["--repair", "etc/app"], "is not an absolute, normalised path"),
])
def test_bad_repair_command_lines(replayed, args, wanted):
    assert wanted in error_line(verify(replayed, *args, code=2))


def test_a_hard_link_whose_file_a_later_snap_replaced_is_put_back_as_its_own_file(author, keys, host, tmp_path,
                                                                                 busybox_root):
    # /etc/a.link is held to the first /etc/a it was linked to (a later snap gave /etc/a a new inode).
    hard_link_then_its_file_replaced(author, tmp_path)
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    os.unlink(host.path("/etc/a.link"))
    os.link(host.path("/etc/a"), host.path("/etc/a.link"))
    assert drifted(host) == ["/etc/a.link"]
    verify(host, "--repair")
    assert open(host.path("/etc/a.link")).read() == "first\n" and open(host.path("/etc/a")).read() == "second\n"
    assert os.stat(host.path("/etc/a")).st_nlink == 1
    verify(host)


def test_a_path_that_leads_into_the_state_now_is_not_written(author, keys, host, tmp_path, busybox_root):
    # /etc/app became a link to the state directory since: a file snapped under it would land in the state.
    src = source_tree(tmp_path, "/etc/app/lock", "not the host lock\n")
    author.commit(["--root", src, "snap", "/etc/app/lock"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    shutil.rmtree(host.path("/etc/app"))
    os.symlink("/var/lib/isconf", host.path("/etc/app"))
    proc = verify(host, "--repair", code=8)
    assert ("not repaired: /etc/app/lock: leads into this host's state directory, which no journal entry may "
            "write") in proc.out
    assert open(host.state("lock"), "rb").read() != b"not the host lock\n"


def test_the_running_agents_own_file_passes_its_self_test_before_it_is_put_back(author, keys, host, tmp_path,
                                                                              busybox_root, server):
    # As a snap of it does: the agent running from inside the root is the file repaired.
    busybox_root(host.root)
    put(host.root, AGENT, build("1.0.0"))
    src = str(tmp_path / "src")
    put(src, AGENT, build("1.1.0"))
    author.commit(["--root", src, "snap", AGENT])
    host.init(server.url, keys)

    def agent(*args):
        return subprocess.run([sys.executable, "-I", host.path(AGENT), "--root", host.root] + list(args),
                              env={"PATH": os.environ["PATH"], "ISCONF_AUTHOR": AUTHOR, "LC_ALL": "C.UTF-8"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=300)
    assert agent("up").returncode == 0
    os.chmod(host.path(AGENT), 0o600)
    proc = agent("verify", "--repair")
    out = undated(proc.stdout.decode() + proc.stderr.decode())
    assert proc.returncode == 0, out
    assert "new agent %s passed its self-test: isconf 1.1.0" % AGENT in out and "repaired: %s" % AGENT in out
    assert stat.S_IMODE(os.stat(host.path(AGENT)).st_mode) == 0o644


def test_a_hard_link_of_a_file_out_of_reach_is_left_too(author, keys, host, tmp_path, busybox_root):
    src = source_tree(tmp_path, "/etc/a", "first\n")
    os.link(os.path.join(src, "etc/a"), os.path.join(src, "etc/a.link"))
    author.commit(["--root", src, "snap", "/etc/a", "/etc/a.link"], ["exec", "--no-run", "--", "/bin/rm", "/etc/a"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    os.chown(host.path("/etc/a.link"), 1, 1)
    proc = verify(host, "--repair", code=8)
    assert "not repaired: /etc/a.link: a hard link of /etc/a, which is not repaired" in proc.out
    assert os.stat(host.path("/etc/a.link")).st_uid == 1


def test_status_shows_the_last_repair_alone(replayed):
    host = replayed
    change_owner(host)
    retarget_link(host)
    verify(host, "--repair", "/etc/app/current")
    verify(host, "--repair")
    assert [r["paths"] for r in json.loads(host("status", "--json").out)["repaired"]] == [
        ["/etc/app/app.conf", "/etc/app/app.conf.link"]]
    assert len([l for l in host("log").out.splitlines() if "repaired" in l]) == 2  # log keeps them all


def test_a_link_on_the_way_never_leads_a_repair_out_of_the_root(author, keys, host, tmp_path, busybox_root):
    # /etc/app became a link to a directory outside the root: followed inside the root, as a chroot would.
    src = source_tree(tmp_path, "/etc/app/motd", "hello\n")
    author.commit(["--root", src, "snap", "/etc/app/motd"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(host.path("/etc/app"))
    os.symlink(str(outside), host.path("/etc/app"))
    verify(host, "--repair")
    assert os.listdir(str(outside)) == []
    assert open(host.path(str(outside / "motd"))).read() == "hello\n"  # the link's target, inside the root
