"""up --dry-run --diff: what each pending snap would change on this host's disk, and a dry run that stops where
a plain 'up' would stop and marks a transaction that failed at its last run."""

import glob
import hashlib
import json
import os
import shutil

import pytest

from conftest import KILL_AGENT, Author, error_line, replace_file, run_isconf

SECRET_OLD = b"db_password=old-Vq8xZ3\n"
SECRET_NEW = b"db_password=new-Kp4wT9\n"


@pytest.fixture
def site(author, keys, host, busybox_root, tmp_path):
    """A host following the repository, and the author's reference root to snap from (both with busybox)."""
    busybox_root(host.root)
    src = str(tmp_path / "src")
    busybox_root(src)
    host.init(author.repo, keys)
    return host, src


def snap(author, src, *paths):
    author.commit(["--root", src, "snap"] + list(paths))


def dry(host, *extra, **kw):
    """up --dry-run --diff, text and JSON, each exiting 11 (something pending) unless expect says otherwise."""
    expect = kw.get("expect", "pending")
    text = host("up", "--dry-run", "--diff", *extra, expect=expect).out
    plan = json.loads(host("up", "--dry-run", "--diff", "--json", *extra, expect=expect).out)
    return text, plan


def changes(plan, seq):
    (item,) = [t for t in plan["transactions"] if t["seq"] == seq]
    return item["changes"]


@pytest.mark.parametrize("python", [None, "3.6"], ids=["default", "3.6"])
def test_a_changed_text_file_shows_as_a_unified_diff_and_the_disk_is_untouched(author, site, python):
    host, src = site
    if python:  # the oldest interpreter the agent supports
        found = sorted(glob.glob("/root/.pyenv/versions/%s.*/bin/python3" % python))
        assert found, "no Python %s under /root/.pyenv" % python
        host.python = found[-1]
    replace_file(src, "etc/app.conf", b"listen 8080\nworkers 4\nlog /var/log/app\n")
    replace_file(host.root, "etc/app.conf", b"listen 80\nworkers 4\nlog /var/log/app\n")
    snap(author, src, "/etc/app.conf")
    before = host.snapshot(), sorted(os.listdir(host.state("objects")))
    text, plan = dry(host)
    lines = text.splitlines()
    at = lines.index("would apply 1 snap /etc/app.conf")
    assert lines[at + 1:at + 8] == ["  /etc/app.conf: content", "    --- /etc/app.conf", "    +++ /etc/app.conf",
                                    "    @@ -1,3 +1,3 @@", "    -listen 80", "    +listen 8080",
                                    "     workers 4"], text
    (change,) = changes(plan, 1)
    assert change["path"] == "/etc/app.conf" and change["what"] == "content" and change["note"] is None
    assert "-listen 80\n+listen 8080\n" in change["diff"]
    assert (change["before"]["size"], change["after"]["size"]) == (37, 39)
    assert change["before"]["sha256"] == hashlib.sha256(b"listen 80\nworkers 4\nlog /var/log/app\n").hexdigest()
    assert change["after"]["sha256"] == hashlib.sha256(b"listen 8080\nworkers 4\nlog /var/log/app\n").hexdigest()
    # nothing written: no object staged, nothing applied, no run recorded
    assert (host.snapshot(), sorted(os.listdir(host.state("objects")))) == before
    host("up", expect="ok")
    assert dry(host, expect="ok")[1]["transactions"] == []


def test_a_new_text_file_is_a_diff_from_nothing(author, site):
    host, src = site
    replace_file(src, "etc/motd", b"welcome\n")
    snap(author, src, "/etc/motd")
    text, plan = dry(host)
    assert "  /etc/motd: new regular file (mode 0644, owner root, group root, 8 bytes, sha256 %s)" \
        % hashlib.sha256(b"welcome\n").hexdigest() in text.splitlines(), text
    assert "    --- /dev/null" in text and "    +welcome" in text
    (change,) = changes(plan, 1)
    assert (change["what"], change["before"], change["after"]["type"]) == ("new", None, "regular file")


@pytest.mark.parametrize("old,new", [(b"\x7fELF\x00\x01old" * 10, b"\x7fELF\x00\x02new-build" * 20),
                                     (b"caf\xe9 old\n", b"caf\xe9 new-build\n")], ids=["NUL", "not-UTF-8"])
def test_a_binary_file_shows_its_sizes_and_hashes_not_its_bytes(author, site, old, new):
    host, src = site
    replace_file(src, "usr/lib/app.so", new)
    replace_file(host.root, "usr/lib/app.so", old)
    snap(author, src, "/usr/lib/app.so")
    text, plan = dry(host)
    assert ("  /usr/lib/app.so: content (binary): regular file, %d bytes, sha256 %s -> regular file, %d bytes, sha256 %s"
            % (len(old), hashlib.sha256(old).hexdigest(), len(new), hashlib.sha256(new).hexdigest())) in text, text
    assert "new-build" not in text and "@@" not in text
    (change,) = changes(plan, 1)
    assert (change["diff"], change["note"]) == (None, "binary")
    assert change["before"] == {"type": "regular file", "size": len(old), "sha256": hashlib.sha256(old).hexdigest()}
    assert change["after"] == {"type": "regular file", "size": len(new), "sha256": hashlib.sha256(new).hexdigest()}


BIG = b"x" * (1024 * 1024) + b"\n"


@pytest.mark.parametrize("old,new", [(b"small\n", BIG), (BIG, b"small\n")], ids=["grows", "shrinks"])
def test_a_file_over_a_mebibyte_shows_its_sizes_and_hashes(author, site, old, new):
    host, src = site
    replace_file(src, "srv/big.txt", new)
    replace_file(host.root, "srv/big.txt", old)
    snap(author, src, "/srv/big.txt")
    text, plan = dry(host)
    # a file on disk over the bound, and of another size than the snap's, is not read at all
    before = hashlib.sha256(old).hexdigest() if len(old) < len(BIG) else "not read"
    assert ("  /srv/big.txt: content (larger than 1048576 bytes): regular file, %d bytes, sha256 %s -> regular file, "
            "%d bytes, sha256 %s" % (len(old), before, len(new), hashlib.sha256(new).hexdigest())) \
        in text.splitlines(), text
    assert "@@" not in text and changes(plan, 1)[0]["diff"] is None


@pytest.mark.parametrize("disk_mode,snap_mode", [(0o600, 0o600), (0o644, 0o600), (0o600, 0o644), (0o640, 0o400),
                                                (0o644, 0o640), (0o640, 0o644)],
                         ids=["both-private", "made-private", "was-private", "group-readable-to-private",
                              "made-group-readable", "was-group-readable"])   # as /etc/shadow: not for all
def test_a_secret_shows_only_that_it_changes(author, site, disk_mode, snap_mode):
    host, src = site
    replace_file(src, "etc/app/db.conf", SECRET_NEW, mode=snap_mode)
    replace_file(src, "etc/app/new.key", SECRET_NEW + b"2", mode=0o600)
    replace_file(host.root, "etc/app/db.conf", SECRET_OLD, mode=disk_mode)
    snap(author, src, "/etc/app/db.conf", "/etc/app/new.key")
    text, plan = dry(host)
    private = snap_mode if not snap_mode & 0o004 else disk_mode
    assert "  /etc/app/db.conf: content changes (mode %04o: not shown)" % private in text.splitlines(), text
    assert "  /etc/app/new.key: new regular file (mode 0600, owner root, group root, content not shown)" \
        in text.splitlines(), text
    raw = host("up", "--dry-run", "--diff", "--json", expect="pending").stdout + \
        host("up", "--dry-run", "--diff", expect="pending").stdout
    for secret in (SECRET_OLD, SECRET_NEW, SECRET_NEW + b"2"):
        assert secret.split(b"=")[1].strip() not in raw
        # nor its hash, where the changes are told (the journal, and so the object list, names each object)
        assert hashlib.sha256(secret).hexdigest() not in json.dumps(plan["transactions"])
        assert hashlib.sha256(secret).hexdigest() not in text.split("  object ")[0]
    (content,) = [c for c in changes(plan, 1) if c["path"] == "/etc/app/db.conf" and c["what"] == "content"]
    assert (content["before"], content["after"], content["diff"]) == (None, None, None)


def test_mode_owner_link_target_directory_and_hard_link_changes_are_one_line_each(author, site):
    host, src = site
    for root, mode, uid, target in ((src, 0o644, 0, "app.conf"), (host.root, 0o664, 33, "old.conf")):
        replace_file(root, "etc/app/app.conf", b"listen 8080\n", mode=mode, uid=uid, gid=uid)
        os.symlink(target, os.path.join(root, "etc/app/current"))
    os.link(os.path.join(src, "etc/app/app.conf"), os.path.join(src, "etc/app/app.conf.link"))
    replace_file(host.root, "etc/app/app.conf.link", b"listen 8080\n")  # same bytes, its own inode
    os.makedirs(os.path.join(src, "srv/www"), mode=0o750)
    os.chmod(os.path.join(src, "srv/www"), 0o750)
    snap(author, src, "/etc/app/app.conf", "/etc/app/app.conf.link", "/etc/app/current", "/srv/www")
    text, plan = dry(host)
    lines = text.splitlines()
    for line in ("  /etc/app/app.conf: mode 0664 -> 0644", "  /etc/app/app.conf: owner www -> root",
                 "  /etc/app/app.conf: group www -> root",
                 "  /etc/app/app.conf.link: becomes a hard link of /etc/app/app.conf",
                 "  /etc/app/current: link target old.conf -> app.conf",
                 "  /srv/www: new directory (mode 0750, owner root, group root)"):
        assert line in lines, text
    assert "@@" not in text  # the same content: no diff
    found = [(c["path"], c["what"], c["before"], c["after"]) for c in changes(plan, 1)]
    assert ("/etc/app/app.conf", "mode", "0664", "0644") in found
    assert ("/etc/app/current", "target", "old.conf", "app.conf") in found
    assert ("/etc/app/app.conf.link", "hardlink", None, "/etc/app/app.conf") in found
    assert all(set(c) == {"path", "what", "before", "after", "diff", "note"} for c in changes(plan, 1))


def test_a_new_link_shows_its_target(author, site):
    host, src = site
    os.symlink("sites-available/web", os.path.join(src, "etc/site"))
    snap(author, src, "/etc/site")
    text, plan = dry(host)
    assert "  /etc/site: new symbolic link (-> sites-available/web, owner root, group root)" in text.splitlines(), text


def test_a_path_an_earlier_pending_snap_writes_says_so(author, site):
    host, src = site
    replace_file(host.root, "etc/motd", b"one\n")
    replace_file(src, "etc/motd", b"two\n")
    snap(author, src, "/etc/motd")
    replace_file(src, "etc/motd", b"three\n")
    snap(author, src, "/etc/motd")
    text, plan = dry(host)
    assert "  /etc/motd: written by transaction 1 first; shown against the disk as it is now" in text.splitlines()
    assert "    +three" in text.split("would apply 2")[1] and "    -one" in text.split("would apply 2")[1]
    assert changes(plan, 2)[0]["what"] == "earlier" and changes(plan, 2)[0]["before"] == 1


def test_a_type_change_says_so(author, site):
    host, src = site
    replace_file(src, "etc/app.d", b"one file now\n")
    os.makedirs(os.path.join(host.root, "etc/app.d"))
    snap(author, src, "/etc/app.d")
    text, plan = dry(host)
    assert "  /etc/app.d: type change: directory -> regular file (mode 0644, owner root, group root, 13 bytes, " \
        "sha256 %s)" % hashlib.sha256(b"one file now\n").hexdigest() in text.splitlines(), text
    (change,) = changes(plan, 1)
    assert (change["what"], change["before"], change["after"]["type"]) == ("type", "directory", "regular file")


def test_a_snap_that_changes_nothing_says_so(author, site):
    host, src = site
    for root in (src, host.root):
        replace_file(root, "etc/motd", b"same\n")
    snap(author, src, "/etc/motd")
    text, plan = dry(host)
    assert "would apply 1 snap /etc/motd\n  (no change on disk)\n" in text and changes(plan, 1) == []


def test_the_listing_stops_at_a_reboot_entry_as_up_does(author, site):
    host, _ = site
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/before"], ["reboot"],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    text, plan = dry(host)
    assert "would apply 1 exec /bin/touch /tmp/before" in text and "would stop at 2 reboot" in text
    # the host is a --root: the advice is up's own there, not a reboot of the machine running isconf
    assert "transaction 2 is a reboot: %s is not the machine running isconf" % host.root in text
    assert "(README: Building a target disk from a miniroot); 1 more after it not reached" in text
    assert "/tmp/after" not in text, text
    assert [t["action"] for t in plan["transactions"]] == ["apply", "stop", "not-reached"]
    assert plan["stop"]["seq"] == 2 and plan["stop"]["exit_code"] == 5
    # with -r, up records the reboot and reboots: what follows waits still
    text, plan = dry(host, "-r")
    assert "would apply 2 reboot" in text and "would apply 3" not in text and "ends the run" in text
    assert [t["action"] for t in plan["transactions"]] == ["apply", "apply", "not-reached"]
    assert (plan["stop"]["seq"], plan["stop"]["exit_code"]) == (2, 0)


def test_a_retracted_entry_is_listed_as_skipped(author, site):
    host, _ = site
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/bad"])
    author.commit(["retract", "1", "-m", "wrong file"])
    text, plan = dry(host)
    assert "would skip 1 exec /bin/touch /tmp/bad (retracted by 2)" in text and "would apply 1" not in text
    assert plan["transactions"][0]["action"] == "retracted" and plan["transactions"][0]["by_seq"] == 2


def test_a_transaction_that_failed_last_run_is_marked(author, site):
    host, _ = site
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "exit 3"])
    host("up", expect="failed")
    text, plan = dry(host)
    assert "would apply 1 exec /bin/sh -c 'exit 3' (failed last run: exit 3)" in text.splitlines(), text
    failed = plan["transactions"][0]["failed_last_run"]
    assert failed["status"] == 3 and "exited with status 3" in failed["error"] and failed["time"]


@pytest.mark.parametrize("status", ["3", [3], None])
def test_a_failed_record_whose_status_is_not_a_number_is_marked_by_its_error(author, site, status):
    # A damaged history record: its status printed with %d was an internal error (exit 70).
    host, _ = site
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "exit 3"])
    host("up", expect="failed")
    with open(host.state("history")) as f:
        records = [json.loads(line) for line in f]
    records[-1]["status"] = status
    with open(host.state("history"), "w") as f:
        f.writelines(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n" for record in records)
    text, plan = dry(host)
    assert "would apply 1 exec /bin/sh -c 'exit 3' (failed last run: " in text, text
    assert plan["transactions"][0]["failed_last_run"]["status"] is None


def test_a_transaction_up_would_halt_stops_the_listing(author, site):
    host, _ = site
    # the command kills the agent: a start that never ends, counted toward interrupted_max (1 here)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", KILL_AGENT],
                  ["exec", "--no-run", "--", "/bin/touch", "/tmp/after"])
    host("init", "--force", author.repo, "--branch", "web", "--signers", author.keys.signers,
         "--interrupted-max", "1", expect="ok")
    assert host("up").returncode == -9
    text, plan = dry(host, expect="ok")   # nothing would run: 0, not 11
    assert "would stop at 1 exec /bin/sh -c 'kill -KILL $(" in text
    assert "transaction 1 halts: started 1 time without ending (interrupted_max 1)" in text
    assert "/tmp/after" not in text
    assert (plan["stop"]["seq"], plan["stop"]["exit_code"]) == (1, 1)


def test_diff_without_dry_run_is_a_usage_error(site):
    host, _ = site
    assert "--diff goes with --dry-run" in error_line(host("up", "--diff", expect="usage"))


def test_the_json_carries_what_the_text_shows(author, site):
    host, src = site
    replace_file(src, "etc/motd", b"new\n")
    replace_file(host.root, "etc/motd", b"old\n")
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "exit 2"])
    host("up", expect="failed")
    author.commit(["--root", src, "snap", "/etc/motd"], ["reboot"], ["exec", "--no-run", "--", "/bin/true"])
    text, plan = dry(host)
    assert set(plan) == {"schema", "branch", "head_seq", "applied_seq", "transactions", "stop", "objects",
                         "fetch_bytes", "needs_newer"}
    assert (plan["schema"], plan["applied_seq"], plan["head_seq"], plan["needs_newer"]) == (1, 0, 4, None)
    assert [(t["seq"], t["kind"], t["action"]) for t in plan["transactions"]] == \
        [(1, "exec", "apply"), (2, "snap", "apply"), (3, "reboot", "stop"), (4, "exec", "not-reached")]
    assert all({"seq", "id", "kind", "summary", "action", "failed_last_run", "changes"} <= set(t)
               for t in plan["transactions"])
    first, snapped = plan["transactions"][:2]
    assert first["failed_last_run"]["status"] == 2 and first["changes"] is None  # an exec: its command only
    assert "(failed last run: exit 2)" in text
    (change,) = snapped["changes"]
    assert change["diff"] == "--- /etc/motd\n+++ /etc/motd\n@@ -1 +1 @@\n-old\n+new"
    assert "\n".join("    " + line for line in change["diff"].splitlines()) in text
    assert (plan["stop"]["seq"], plan["stop"]["exit_code"]) == (3, 5)
    assert plan["stop"]["message"].startswith("transaction 3 is a reboot: %s is not the machine running isconf"
                                              % host.root)
    assert plan["stop"]["message"] + "; 1 more after it not reached" in text
    # without --diff, the same listing, and no changes
    bare = json.loads(host("up", "--dry-run", "--json", expect="pending").out)
    assert [t["action"] for t in bare["transactions"]] == ["apply", "apply", "stop", "not-reached"]
    assert all(t["changes"] is None for t in bare["transactions"]) and bare["stop"] == plan["stop"]


def object_path(author, content):
    return os.path.join(author.repo, "objects", hashlib.sha256(content).hexdigest())


def test_an_object_one_mirror_swapped_is_read_from_the_next_mirror(author, site, tmp_path):
    # The dry run fails over as a run does: a refusal from the first mirror, the bytes from the second.
    host, src = site
    replace_file(src, "etc/motd", b"from the journal\n")
    replace_file(host.root, "etc/motd", b"on this host\n")
    snap(author, src, "/etc/motd")
    swapped = str(tmp_path / "swapped")
    shutil.copytree(author.repo, swapped)
    with open(object_path(Author(swapped), b"from the journal\n"), "wb") as f:
        f.write(b"swapped by a mirror\n"[:17])
    host("init", "--force", swapped, author.repo, expect="ok")
    proc = host("up", "--dry-run", "--diff", expect="pending")
    assert "+from the journal" in proc.out and "swapped" not in proc.out, proc.out
    assert "does not match the signed journal" in proc.err and swapped in proc.err, proc.err


def test_the_diff_reads_a_staged_object_before_asking_a_mirror(author, site):
    host, src = site
    replace_file(src, "etc/motd", b"from the journal\n")
    replace_file(host.root, "etc/motd", b"on this host\n")
    # an up halted at a failure before the snap has staged the snap's object (everything is fetched first)
    author.commit(["exec", "--no-run", "--", "/bin/false"], ["--root", src, "snap", "/etc/motd"])
    host("up", expect="failed")
    os.unlink(object_path(author, b"from the journal\n"))
    text, plan = dry(host)
    assert "    +from the journal" in text and "    -on this host" in text


def test_a_fetched_object_that_does_not_match_the_journal_is_refused_and_not_shown(author, site):
    host, src = site
    replace_file(src, "etc/motd", b"from the journal\n")
    replace_file(host.root, "etc/motd", b"on this host\n")
    snap(author, src, "/etc/motd")
    with open(object_path(author, b"from the journal\n"), "wb") as f:
        f.write(b"swapped by a mirror\n"[:17])  # the same size, other bytes
    proc = host("up", "--dry-run", "--diff", expect="refused")
    assert "does not match the signed journal" in error_line(proc) and "swapped" not in proc.out


def test_the_help_of_diff_says_every_mode_it_keeps_out(isconf):
    # A group-readable key (0640) is kept out as a 0600 one is: the help must not promise less.
    text = " ".join(run_isconf("up", "--help", expect="ok").out.split())
    assert "a file others may not read, as 0600 or 0640, on disk or in the snap, only as changing" in text, text
    assert isconf.private_mode(0o640) and isconf.private_mode(0o600) and not isconf.private_mode(0o644)
