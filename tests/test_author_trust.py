"""Write access to the repository directory alone never yields a signed entry (DESIGN rule 14): every
verb that writes a head verifies the branch as a host would, staged work is bound to its lock, objects
are checked by hash, trust files are parsed before they ship, and the repository is reached without
following links or blocking on FIFOs."""

import hashlib
import json
import os
import resource
import subprocess

import pytest

from conftest import Author, Keys, append_entry, canary_ahead, error_line, replace_file, source_tree


def published(author):
    """Everything a host could fetch of the branch: journal, head and its signature, byte for byte."""
    files = {}
    for name in ("journal", "head", "head.sig"):
        path = author.path(name)
        files[name] = open(path, "rb").read() if os.path.exists(path) else None
    return files


def append_forged_entry(author, argv):
    """An entry appended by someone who can write the repository but holds no key."""
    append_entry(author, author="mallory@example", kind="exec", argv=argv, cwd="/")


def staged_path(author):
    return os.path.join(author.repo, "authoring", author.branch, "staged")


@pytest.mark.parametrize("verb", ["sign", "ci", "fork"])
def test_a_forged_entry_is_never_signed_by_a_writing_verb(verb, author, keys, server, host, busybox_root):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    append_forged_entry(author, ["/bin/touch", "/forged"])
    if verb == "ci":
        author("lock", "-m", "an honest change")
        author("exec", "--no-run", "--", "/bin/true")
    before = published(author)
    args = {"sign": ["sign", "--sign", keys.private, "--expires", "30d"], "ci": ["ci", "--sign", keys.private],
            "fork": ["fork", "canary", "--sign", keys.private]}[verb]
    line = error_line(author(*args, expect="refused"))
    assert "does not verify" in line and "nothing written" in line, line
    assert published(author) == before and not os.path.exists(os.path.join(author.repo, "branches", "canary"))
    busybox_root(host.root)
    host.init(server.url, keys)
    host("up", expect="refused")
    assert not os.path.exists(host.path("/forged"))


@pytest.mark.parametrize("verb", ["ci", "sign"])
def test_an_old_signed_head_put_back_is_never_built_on(verb, author, keys):
    # the old head and its signature are valid: a ci on it would sign a fork of what hosts applied since
    author.commit(["exec", "--no-run", "--", "/bin/echo", "one"])
    old = published(author)
    author.commit(["exec", "--no-run", "--", "/bin/echo", "two"])
    author("lock", "-m", "three")
    author("exec", "--no-run", "--", "/bin/echo", "three")
    for name in ("head", "head.sig"):
        with open(author.path(name), "wb") as f:
            f.write(old[name])
    journal = author.journal()
    line = error_line(author(*{"ci": ["ci", "--sign", keys.private], "sign": ["sign", "--sign", keys.private]}[verb],
                             expect="refused"))
    assert "older than" in line and "rollback" in line and "nothing written" in line, line
    assert published(author) == dict(old, journal=journal)


@pytest.mark.parametrize("verb", ["sign", "ci"])
def test_a_head_claiming_a_huge_journal_is_refused_before_the_journal_is_read(verb, author, keys):
    # the head's length is only trusted once its signature verified: a planted 4 GiB one is never read
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    if verb == "ci":
        author("lock", "-m", "x")
        author("exec", "--no-run", "--", "/bin/true")
    head = json.loads(open(author.path("head")).read())
    with open(author.path("head"), "w") as f:
        f.write(json.dumps(dict(head, length=4 << 30), sort_keys=True, separators=(",", ":")) + "\n")
    with open(author.path("journal"), "r+b") as f:
        f.truncate(4 << 30)  # sparse: no disk used
    args = ["sign", "--sign", keys.private] if verb == "sign" else ["ci", "--sign", keys.private]
    line = error_line(author(*args, limits={resource.RLIMIT_AS: 1 << 30}, expect="refused"))
    assert "does not verify" in line and "nothing written" in line, line


def test_a_rewritten_entry_names_the_last_entry_that_verified(author, keys):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    author.commit(["exec", "--no-run", "--", "/bin/false"])
    journal = author.journal().replace(b"/bin/false", b"/bin/evil!")
    with open(author.path("journal"), "wb") as f:
        f.write(journal)
    line = error_line(author("sign", "--sign", keys.private, expect="refused"))
    assert "entry 2" in line and "the last entry that verified is seq 1" in line, line


@pytest.mark.parametrize("mac", ["copied", "none"])
def test_a_staged_line_someone_else_wrote_is_refused_at_ci(mac, author, keys):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("exec", "--no-run", "--", "/bin/echo", "mine")
    with open(staged_path(author), "rb") as f:
        mine = json.loads(f.read().splitlines()[0])
    forged = dict(mine, argv=["/bin/touch", "/forged"])  # the MAC of another line, or none at all
    if mac == "none":
        del forged["mac"]
    with open(staged_path(author), "ab") as f:
        f.write(json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    before = published(author)
    refused = error_line(author.ci(expect="refused"))
    assert "staged line 2" in refused and "not staged under this lock" in refused, refused
    assert published(author) == before and b"/forged" not in author.journal()


def test_staged_lines_swapped_are_refused(author):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("exec", "--no-run", "--", "/bin/echo", "one")
    author("exec", "--no-run", "--", "/bin/echo", "two")
    with open(staged_path(author), "rb") as f:
        one, two = f.read().splitlines()
    with open(staged_path(author), "wb") as f:
        f.write(two + b"\n" + one + b"\n")
    assert "not staged under this lock" in error_line(author.ci(expect="refused"))


@pytest.mark.parametrize("replay", ["unstaged", "truncated"])
def test_staged_lines_put_back_from_an_older_staged_file_are_refused(replay, author):
    # unstaged: a line the author unstaged, put back over the one staged since; truncated: the staged file cut
    # short, the author stages on, and a line cut off is put back after it, out of the author's order.
    author.commit(["reboot"])
    author("lock", "-m", "x")
    for word in ("one", "two", "three"):
        author("exec", "--no-run", "--", "/bin/echo", word)
    with open(staged_path(author), "rb") as f:
        saved = f.read().splitlines(True)
    if replay == "unstaged":
        author("unstage", "3")
    else:
        with open(staged_path(author), "wb") as f:
            f.write(b"".join(saved[:1]))
    author("exec", "--no-run", "--", "/bin/echo", "four")
    with open(staged_path(author), "rb") as f:
        now = f.read().splitlines(True)
    with open(staged_path(author), "wb") as f:
        f.write(b"".join(saved if replay == "unstaged" else now + saved[2:]))
    before = published(author)
    line = error_line(author.ci(expect="refused"))
    assert "not staged under this lock" in line, line
    assert published(author) == before


def test_a_lock_broken_and_put_back_with_its_staged_work_is_not_adopted_in_silence(author, tmp_path):
    # bob breaks alice's lock from his machine (her secret stays on hers); someone puts the lock and its staged
    # work back: alice's next lock says what it keeps, instead of her ci signing it unawares
    author.commit(["reboot"])
    author("lock", "-m", "first try")
    author("exec", "--no-run", "--", "/bin/touch", "/abandoned")
    work = os.path.join(author.repo, "authoring", "web")
    saved = {name: open(os.path.join(work, name), "rb").read() for name in ("lock", "staged")}
    author("unlock", "--force", env={"ISCONF_AUTHOR": "bob@example", "XDG_STATE_HOME": str(tmp_path / "bob")})
    for name, data in saved.items():
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
    err = author("lock", "-m", "a new change").err
    assert "you already held the lock of branch web" in err and "1 staged entry stay staged" in err, err


def test_a_staged_object_with_the_right_size_and_wrong_bytes_is_refused(author, tmp_path):
    author.commit(["reboot"])
    src = source_tree(tmp_path, "/etc/motd", "the real banner\n")
    author("lock", "-m", "banner")
    author("--root", src, "snap", "/etc/motd")
    sha = hashlib.sha256(b"the real banner\n").hexdigest()
    obj = os.path.join(author.repo, "objects", sha)
    os.chmod(obj, 0o644)
    with open(obj, "wb") as f:
        f.write(b"a swapped banner")  # the same length
    before = published(author)
    line = error_line(author.ci(expect="refused"))
    assert sha[:16] in line and "not what it was snapped as" in line, line
    assert published(author) == before


def test_ci_refuses_a_key_the_hosts_do_not_trust(author, tmp_path):
    author.commit(["reboot"])
    stranger = Keys(str(tmp_path / "stranger"))
    author("lock", "-m", "x")
    author("reboot")
    before = published(author)
    line = error_line(author("ci", "--sign", stranger.private, expect="usage"))
    assert "hosts would refuse a head signed with" in line and "not in allowed_signers" in line, line
    assert published(author) == before


def test_ci_refuses_an_ecdsa_key_hosts_cannot_verify(author, tmp_path):
    author.commit(["reboot"])
    key = str(tmp_path / "id_ecdsa")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", key], check=True, stdin=subprocess.DEVNULL)
    author("lock", "-m", "x")
    author("reboot")
    before = published(author)
    assert "hosts would refuse" in error_line(author("ci", "--sign", key, expect="usage"))
    assert published(author) == before


def test_the_first_signed_check_in_needs_the_hosts_keys(author, keys):
    author("lock", "-m", "x")
    author("reboot")
    line = error_line(author("ci", "--sign", keys.private, env={"ISCONF_SIGNERS": ""}, expect="usage"))
    assert "--signers FILE" in line and not os.path.exists(author.path("head"))


@pytest.mark.parametrize("path,text,fragment", [
    ("/etc/isconf/allowed_signers", "admin@example ssh-ed25519 AAAAnot-base64\n", "allowed_signers:1"),
    ("/etc/isconf/isconf.conf", "[isconf]\nbranch = web\nurls = http://x/\ntimeout = soon\n", "timeout"),
])
def test_a_trust_or_config_file_hosts_would_refuse_never_ships(path, text, fragment, author, tmp_path):
    author.commit(["reboot"])
    src = source_tree(tmp_path, path, text)
    author("lock", "-m", "trust")
    line = error_line(author("--root", src, "snap", path, expect="usage"))
    assert "would be refused by every host" in line and fragment in line, line
    assert "nothing staged" in error_line(author.ci(expect="usage"))


@pytest.mark.parametrize("path,link,text,mode,fragment", [
    ("/etc/isconf/allowed_signers", "hard", "admin@example ssh-ed25519 AAAAnot-base64\n", 0o644, "allowed_signers:1"),
    ("/etc/isconf/allowed_signers", "hard", "", 0o666, "writable by group or others"),
    ("/etc/isconf/isconf.conf", "symbolic", "[isconf]\nbranch = web\n", 0o644, "only as a regular file"),
    ("/etc/isconf/allowed_signers", "symbolic", "", 0o644, "only as a regular file"),
])
def test_a_trust_or_config_file_snapped_as_a_link_hosts_would_refuse_never_ships(path, link, text, mode, fragment,
                                                                                  author, keys, tmp_path):
    # its bytes and mode are another path's: a hard link to a file hosts would refuse, or a symbolic link, which
    # hosts never follow to their trusted keys or config
    author.commit(["reboot"])
    src = source_tree(tmp_path, "/tmp/other", text or open(keys.signers).read())
    os.chmod(os.path.join(src, "tmp/other"), mode)
    os.makedirs(os.path.join(src, "etc/isconf"))
    if link == "hard":
        os.link(os.path.join(src, "tmp/other"), os.path.join(src, path[1:]))
    else:
        os.symlink("/tmp/other", os.path.join(src, path[1:]))
    author("lock", "-m", "trust")
    line = error_line(author("--root", src, "snap", "/tmp/other", path, expect="usage"))
    assert path in line and fragment in line, line
    assert "nothing staged" in error_line(author.ci(expect="usage"))


def test_a_branch_that_does_not_exist_is_refused_naming_those_that_do(author):
    author.commit(["reboot"])
    for args in (["lock", "-m", "x"], ["exec", "--no-run", "--", "/bin/true"], ["reboot"], ["ci", "--unsigned"]):
        line = error_line(author("--branch", "wbe", *args, expect="usage"))
        assert "branch wbe does not exist" in line and "the branches are web" in line, line
    assert not os.path.exists(os.path.join(author.repo, "branches", "wbe"))
    author("--branch", "wbe", "lock", "--new", "-m", "a branch on purpose")
    author("--branch", "wbe", "reboot")
    author("--branch", "wbe", "ci", "--unsigned")
    assert os.path.exists(os.path.join(author.repo, "branches", "wbe", "head"))


def test_lock_new_of_a_branch_that_exists_is_refused_and_takes_no_lock(author):
    # 'lock --new' says "a branch of my own": a name already taken would put the work on that branch's hosts.
    author.commit(["reboot"])
    line = error_line(author("lock", "--new", "-m", "my new role", expect="usage"))
    assert line == ("isconf: error: branch web already exists: 'isconf lock -m WHY' changes it; a new branch needs a "
                    "name not taken (the branches are web)"), line
    assert not os.path.exists(author.path("..", "..", "authoring", "web", "lock"))
    author("--branch", "web2", "lock", "--new", "-m", "a new one")
    author("--branch", "web2", "lock", "--new", "-m", "taken again, still unpublished")


def test_branches_lists_seq_signer_and_lock(author, keys):
    author.commit(["reboot"], ["reboot"])
    author("lock", "-m", "the next change")
    rows = json.loads(author("branches", "--json").out)
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", keys.public], stdout=subprocess.PIPE).stdout.split()[1]
    assert [(r["branch"], r["seq"], r["signed_by"]) for r in rows] == [("web", 2, fingerprint.decode())]
    assert rows[0]["lock"]["why"] == "the next change" and rows[0]["lock"]["age"] >= 0
    assert "web" in author("branches").out


def test_staged_lists_and_unstage_drops_one(author):
    author.commit(["reboot"])
    author("lock", "-m", "three changes")
    for word in ("one", "two", "three"):
        author("exec", "--no-run", "-m", "say " + word, "--", "/bin/echo", word)
    items = json.loads(author("staged", "--json").out)
    assert [(i["number"], i["summary"], i["message"]) for i in items] == [
        (1, "exec /bin/echo one", "say one"), (2, "exec /bin/echo two", "say two"),
        (3, "exec /bin/echo three", "say three")]
    assert "not staged" not in author("unstage", "2").err
    assert "nothing is staged as number 3" in error_line(author("unstage", "3", expect="usage"))
    out = author.ci().out
    assert "appended 2 exec /bin/echo one" in out and "appended 3 exec /bin/echo three" in out, out
    assert b"two" not in author.journal() and author.journal().count(b"/bin/echo") == 2


def test_ci_dry_run_shows_what_would_be_published_and_writes_nothing(author):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("exec", "--no-run", "--", "/bin/echo", "later")
    before = published(author)
    out = author.ci("--dry-run").out
    assert "would append 2 exec /bin/echo later" in out and "nothing written" in out, out
    assert published(author) == before
    assert len(json.loads(author("staged", "--json").out)) == 1


@pytest.mark.parametrize("args", [["lock", "-m", "  "], ["exec", "-m", "", "--no-run", "--", "/bin/true"],
                                  ["reboot", "-m", " "], ["ci", "--unsigned", "-m", "\t"]])
def test_a_blank_message_is_refused(args, author):
    author.commit(["reboot"])
    if args[0] != "lock":
        author("lock", "-m", "x")
    assert "-m WHY is empty" in error_line(author(*args, expect="usage"))


BAD_UTF8 = "caf\udce9"  # the byte 0xe9 alone, as a Latin-1 terminal passes 'cafe' with an accent


@pytest.mark.parametrize("args,env", [
    (["lock", "-m", BAD_UTF8], {}), (["exec", "-m", BAD_UTF8, "--no-run", "--", "/bin/true"], {}),
    (["reboot", "-m", BAD_UTF8], {}), (["retract", "1", "-m", BAD_UTF8], {}),
    (["ci", "--unsigned", "-m", BAD_UTF8], {}), (["lock", "-m", "x"], {"ISCONF_AUTHOR": BAD_UTF8})])
def test_a_message_or_author_that_is_not_utf8_is_a_usage_error_and_keeps_the_staged_work(args, env, author):
    author.commit(["reboot"])
    if args[0] != "lock":
        author("lock", "-m", "x")
        author("exec", "--no-run", "--", "/bin/echo", "kept")
    line = error_line(author(*args, env=env, expect="usage"))
    assert "valid UTF-8" in line, line
    if args[0] != "lock":
        assert "exec /bin/echo kept" in author("staged").out


def test_an_unsigned_head_is_signed_only_by_adopting_its_entries(author, keys):
    author("lock", "-m", "x")
    author("exec", "--no-run", "--", "/bin/echo", "unsigned")
    author("ci", "--unsigned")
    line = error_line(author("sign", "--sign", keys.private, expect="refused"))
    assert "is unsigned" in line and "--adopt 1" in line, line
    assert "vouched for 1 exec /bin/echo unsigned" in author("sign", "--sign", keys.private, "--adopt", "1").out
    assert os.path.exists(author.path("head.sig"))


def test_a_forged_publication_record_is_not_published(author, keys, tmp_path):
    author.commit(["reboot"])
    before = published(author)
    head = json.loads(before["head"])
    head["time"] = "2030-01-01T00:00:00Z"
    record = os.path.join(author.repo, "authoring", author.branch, "publishing")
    with open(record, "w") as f:
        json.dump({"head": json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n",
                   "sig": before["head.sig"].decode(), "checkin": False}, f)
    assert "interrupted publication" in error_line(author("lock", "-m", "next", expect="refused"))
    assert published(author) == before


@pytest.mark.parametrize("name", ["staged", "lock"])
def test_a_link_planted_in_the_work_area_is_not_followed(name, author, tmp_path):
    author.commit(["reboot"])
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    author("lock", "-m", "x")
    author("reboot")
    path = os.path.join(author.repo, "authoring", author.branch, name)
    os.unlink(path)
    os.symlink(str(victim), path)
    proc = author.ci(expect="state")
    assert "symbolic link" in error_line(proc) and victim.read_text() == "precious\n"


def test_a_fifo_planted_at_the_lock_does_not_hang_lock(author):
    author.commit(["reboot"])
    os.mkfifo(os.path.join(author.repo, "authoring", author.branch, "lock"))
    assert "FIFO" in error_line(author("lock", "-m", "x", expect="state", timeout=30))


def test_a_link_planted_at_the_journal_is_not_followed(author, tmp_path):
    author.commit(["reboot"])
    victim = tmp_path / "victim"
    victim.write_bytes(author.journal())
    os.unlink(author.path("journal"))
    os.symlink(str(victim), author.path("journal"))
    author("lock", "-m", "x")
    author("reboot")
    assert "symbolic link" in error_line(author.ci(expect="state"))
    assert victim.read_bytes().count(b"\n") == 1


# --- a bad entry fixed forward for the whole fleet: retract -------------------------------------------


def test_a_retraction_carries_a_halted_host_and_a_fresh_host_past_the_entry(author, keys, server, host, tmp_path,
                                                                            busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/one"])
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "exit 3"], why="a bad change")
    host.init(server.url, keys)
    host("up", expect="failed")
    author("lock", "-m", "fix forward")
    assert "retract 2" in author("retract", "2", "-m", "exit 3 was a typo").out
    author("exec", "--no-run", "--", "/bin/touch", "/three")
    author.ci()
    up = host("up", expect="ok")
    assert "retracted by 3" in up.out and os.path.exists(host.path("/three")), up.out
    status = host.status()
    assert status["state"] == "up-to-date" and status["applied_seq"] == 4
    assert [(r["seq"], r["by_seq"], r["why"]) for r in status["retracted"]] == [(2, 3, "exit 3 was a typo")]
    assert "retracted by seq 3: exit 3 was a typo" in host("log", expect="ok").out
    fresh = type(host)(str(tmp_path / "fresh"))
    busybox_root(fresh.root)
    fresh.init(server.url, keys)
    fresh("up", expect="ok")
    assert os.path.exists(fresh.path("/one")) and os.path.exists(fresh.path("/three"))
    assert [e["state"] for e in json.loads(fresh("log", "--json", expect="ok").out)] == [
        "applied", "applied", "retracted", "applied"]


def test_a_host_that_applied_the_entry_records_the_retract_and_changes_nothing(author, keys, server, host,
                                                                               busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo ran >> /ran"])
    host.init(server.url, keys)
    host("up", expect="ok")
    author("lock", "-m", "retire it")
    author("retract", "1", "-m", "not wanted after all")
    author.ci()
    host("up", expect="ok")
    assert open(host.path("/ran")).read() == "ran\n" and host.status()["applied_seq"] == 2


@pytest.mark.parametrize("seq,fragment", [("5", "has no entry 5"), ("2", "itself a retract")])
def test_a_retract_of_an_entry_that_is_not_there_or_is_a_retract_is_refused(seq, fragment, author):
    author.commit(["reboot"])
    author("lock", "-m", "x")
    author("retract", "1", "-m", "no")
    author.ci()
    author("lock", "-m", "y")
    assert fragment in error_line(author("retract", seq, "-m", "again", expect="usage"))


# --- rings: promote -------------------------------------------------------------------------------------


def test_promote_brings_the_canarys_entries_to_its_ring_unchanged(author, keys, server, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    canary = canary_ahead(author, keys, host)
    before = author.journal()
    out = author("promote", "canary", "--sign", keys.private).out
    assert "promoted 2 exec /bin/touch /tmp/canary" in out and "now at seq 2 (1 new)" in out, out
    assert author.journal() == canary.journal() and author.journal().startswith(before)
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/canary"))
    assert [e["id"] for e in json.loads(host("log", "--json", expect="ok").out)] == [
        hashlib.sha256(line).hexdigest() for line in reversed(canary.journal().splitlines())]
    assert "already holds every entry" in author("promote", "canary", "--sign", keys.private).out


def test_promote_is_refused_once_the_ring_has_entries_the_canary_lacks(author, keys, server, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    canary = canary_ahead(author, keys, host)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/web-only"])
    before = published(author)
    line = error_line(author("promote", "canary", "--sign", keys.private, expect="refused"))
    assert "agree up to seq 1, then differ" in line and "nothing written" in line, line
    assert published(author) == before and canary.journal() != author.journal()


# --- snap -r: a tree ----------------------------------------------------------------------------------


def test_snap_r_records_a_tree_and_a_host_gets_it_whole(author, keys, server, host, tmp_path, busybox_root):
    src = tmp_path / "src"
    (src / "etc/web/conf.d").mkdir(parents=True)
    (src / "etc/web/site.conf").write_text("listen 80\n")
    (src / "etc/web/conf.d/a.conf").write_text("a\n")
    (src / "etc/web/skip.swp").write_text("editor junk\n")
    os.symlink("site.conf", str(src / "etc/web/current"))
    os.link(str(src / "etc/web/site.conf"), str(src / "etc/web/site.conf.default"))
    os.chmod(str(src / "etc/web/conf.d"), 0o750)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    author("lock", "-m", "the web tree")
    author("--root", str(src), "snap", "-r", "--exclude", "*.swp", "/etc/web")
    author.ci()
    record = json.loads(author.journal().splitlines()[-1])
    assert {r["path"]: r["type"] for r in record["files"]} == {
        "/etc/web": "dir", "/etc/web/conf.d": "dir", "/etc/web/conf.d/a.conf": "file", "/etc/web/current": "symlink",
        "/etc/web/site.conf": "file", "/etc/web/site.conf.default": "hardlink"}
    busybox_root(host.root)
    host.init(server.url, keys)
    host("up", expect="ok")
    web = host.path("/etc/web")
    assert open(os.path.join(web, "conf.d/a.conf")).read() == "a\n" and os.readlink(os.path.join(web, "current")) \
        == "site.conf"
    assert os.stat(os.path.join(web, "site.conf")).st_ino == os.stat(os.path.join(web, "site.conf.default")).st_ino
    assert os.stat(os.path.join(web, "conf.d")).st_mode & 0o777 == 0o750
    assert not os.path.exists(os.path.join(web, "skip.swp"))


def test_a_directory_snapped_without_r_warns_that_its_contents_are_not_recorded(author, tmp_path):
    src = tmp_path / "src"
    (src / "etc/web").mkdir(parents=True)
    (src / "etc/web/site.conf").write_text("listen 80\n")
    author.commit(["reboot"])
    author("lock", "-m", "the directory alone")
    err = author("--root", str(src), "snap", "/etc/web").err
    assert "records it alone" in err and "snap -r /etc/web" in err, err


def test_snap_r_of_a_tree_of_6000_files_is_staged_and_checked_in(author, tmp_path):
    # its staged line is over 1 MiB, the bound of a history record: staged work has its own
    author.commit(["reboot"])
    doc = str(tmp_path / "src" / "usr" / "share" / "doc")
    os.makedirs(doc)
    for n in range(6000):
        with open(os.path.join(doc, "file-%05d.txt" % n), "w") as f:
            f.write("%d\n" % n)
    author("lock", "-m", "docs")
    author("--root", str(tmp_path / "src"), "snap", "-r", "/usr")
    assert "1 staged" in author("staged").out
    author.ci()
    assert len(json.loads(author.journal().splitlines()[-1])["files"]) == 6003


def test_snap_r_records_a_tree_1100_directories_deep(author, tmp_path):
    author.commit(["reboot"])
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "d"))
    top = os.open(os.path.join(src, "d"), os.O_RDONLY)
    fd = os.dup(top)
    for _ in range(1100):  # a directory at a time: os.makedirs and shutil.rmtree recurse once per level
        os.mkdir("a", dir_fd=fd)
        fd, parent = os.open("a", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
        f.write("at the bottom\n")
    os.close(fd)
    try:
        author("lock", "-m", "deep")
        author("--root", src, "snap", "-r", "/d", "--exclude", "nothing")
        author.ci()
        last = json.loads(author.journal().splitlines()[-1])
        assert [r["path"] for r in last["files"]][-2:] == ["/d" + "/a" * 1100, "/d" + "/a" * 1100 + "/f"]
    finally:
        for depth in range(1100, -1, -1):  # removed from the bottom up, as it was made
            where = os.open("/".join(["."] + ["a"] * depth), os.O_RDONLY, dir_fd=top)
            for name in os.listdir(where):
                (os.rmdir if name == "a" else os.unlink)(name, dir_fd=where)
            os.close(where)
        os.close(top)


def test_snap_r_refuses_a_fifo_in_the_tree_and_stages_nothing(author, tmp_path):
    src = tmp_path / "src"
    (src / "run/app").mkdir(parents=True)
    os.mkfifo(str(src / "run/app/pipe"))
    author.commit(["reboot"])
    author("lock", "-m", "x")
    assert "FIFO" in error_line(author("--root", str(src), "snap", "-r", "/run/app", expect="usage"))
    assert "nothing staged" in error_line(author.ci(expect="usage"))


# --- the reference host stays congruent ---------------------------------------------------------------


def test_the_reference_host_records_what_it_ran_at_author_time_and_never_runs_it_twice(author, keys, server, host,
                                                                                     busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys)
    host("up", expect="ok")
    author("--root", host.root, "lock", "-m", "authored on a host of the branch")
    author("--root", host.root, "exec", "--", "/bin/sh", "-c", "echo line >> /etc/appended")
    author("--root", host.root, "exec", "--no-run", "--", "/bin/sh", "-c", "echo later >> /etc/later")
    out = author("--root", host.root, "ci", "--sign", keys.private).out
    assert "recorded as applied on this host: seq 2 to 2" in out, out
    assert host.status()["applied_seq"] == 2
    host("up", expect="ok")
    assert open(host.path("/etc/appended")).read() == "line\n"  # once: at author time
    assert open(host.path("/etc/later")).read() == "later\n"  # the --no-run one ran at the next up
    assert host.status()["state"] == "up-to-date" and host.status()["applied_seq"] == 3


def test_the_reference_host_judges_its_disk_by_what_it_just_checked_in(author, keys, server, host, busybox_root):
    # Before its next 'up' its copy of the journal ended before the new snap: verify called the new file
    # drift, and 'verify --repair' put the old one back, leaving the reference host unlike its fleet.
    busybox_root(host.root)
    author.commit(["--root", source_tree(host.root + ".src", "/etc/motd", "old\n"), "snap", "/etc/motd"])
    host.init(server.url, keys)
    host("up", expect="ok")
    author("--root", host.root, "lock", "-m", "new motd")
    with open(host.path("/etc/motd"), "w") as f:
        f.write("new motd\n")
    author("--root", host.root, "snap", "/etc/motd")
    author("--root", host.root, "exec", "--no-run", "--", "/bin/touch", "/etc/later")
    out = author("--root", host.root, "ci", "--sign", keys.private).out
    assert "recorded as applied on this host: seq 2 to 2" in out, out
    assert "isconf: no drift in 1 journaled path (applied up to seq 2)" in host("verify", expect="ok").out
    assert host("verify", "--repair", expect="ok").out.startswith("isconf: 0 repaired")
    assert open(host.path("/etc/motd")).read() == "new motd\n"
    log = host("log", expect="ok").out
    assert log.startswith("pending    3 ") and "\napplied    2 " in log, log
    report = host.status()
    assert (report["applied_seq"], report["head_seq"], report["pending"]) == (2, 3, 1), report
    host("up", expect="ok")
    assert os.path.exists(host.path("/etc/later")) and host.status()["state"] == "up-to-date"


def test_a_reference_host_whose_journal_copy_fails_to_take_a_check_in_warns_and_the_ci_stands(author, keys, server,
                                                                                              host, busybox_root):
    # The branch is published before the host's own copy takes the new entries in: a failure there (damaged
    # local state) is this host's alone, a warning, never the check-in's exit code.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host.init(server.url, keys)
    host("up", expect="ok")
    author("--root", host.root, "lock", "-m", "x")
    author("--root", host.root, "exec", "--", "/bin/touch", "/made")
    replace_file(host.root, "var/lib/isconf/head", b"not a head\n", 0o600)
    proc = author("--root", host.root, "ci", "--sign", keys.private)
    assert "this host's copy of the journal stays at its last 'up'" in proc.err, proc.err
    assert "recorded as applied on this host: seq 2 to 2" in proc.out and b'"seq":2' in author.journal()


def test_a_host_behind_the_head_cannot_lock(author, keys, server, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    line = error_line(author("--root", host.root, "lock", "-m", "x", expect="busy"))
    assert "this host is at seq 0, the branch at 1: run 'isconf up' first" in line, line
    host("up", expect="ok")
    author("--root", host.root, "lock", "-m", "x")


def test_a_host_ahead_of_the_repository_cannot_lock_and_is_not_sent_to_up(author, keys, server, host, busybox_root):
    # the repository's head put back to an older one: 'isconf up' would only be refused as a rollback
    busybox_root(host.root)
    host.init(server.url, keys)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    old = published(author)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    for name in ("head", "head.sig"):
        with open(author.path(name), "wb") as f:
            f.write(old[name])
    line = error_line(author("--root", host.root, "lock", "-m", "x", expect="refused"))
    assert "this host applied seq 2, but the head of branch web" in line and "at seq 1" in line, line
    assert "isconf up" not in line and not os.path.exists(os.path.join(author.repo, "authoring", "web", "lock"))


def test_a_root_following_another_branch_cannot_author_this_one(author, keys, server, host):
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, "--branch", "db", "--signers", keys.signers, expect="ok")
    assert "follows branch db, not web" in error_line(author("--root", host.root, "lock", "-m", "x",
                                                             expect="usage"))


def test_ci_warns_when_the_allowed_signers_it_ships_stops_trusting_its_key(author, keys, tmp_path):
    other = Keys(str(tmp_path / "other"))
    src = source_tree(tmp_path, "/etc/isconf/allowed_signers", open(other.signers).read())
    author.commit(["reboot"])
    author("lock", "-m", "hand over to the other key")
    author("--root", src, "snap", "/etc/isconf/allowed_signers")
    err = author.ci().err
    assert "the allowed_signers this check-in ships does not trust" in err, err


def test_an_unsigned_branch_takes_unsigned_check_ins_for_insecure_hosts(tmp_path):
    unsigned = Author(str(tmp_path / "repo"))  # no keys: every publication --unsigned
    unsigned.commit(["reboot"])
    unsigned.commit(["reboot"])
    unsigned("fork", "canary", "--unsigned")
    assert json.loads(open(unsigned.path("head")).read())["seq"] == 2


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_signers_file_that_is_not_there_asks_the_author_for_the_hosts_keys_not_for_init(how, author, keys, tmp_path):
    # 'isconf init' is a host's verb: an author who mistyped --signers is told what file to give.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    missing = str(tmp_path / "allowed_signrs")
    args, env = (["--signers", missing], {}) if how == "option" else ([], {"ISCONF_SIGNERS": missing})
    line = error_line(author("sign", "--sign", keys.private, *args, env=env, expect="usage"))
    assert line == ("isconf: error: --signers: no trusted keys at %s; give the allowed_signers file of the "
                    "branch's hosts" % missing), line
