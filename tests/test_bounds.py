"""Cheap checks before costly ones: a field's size bounded before it is parsed, sizes compared before
hashing, a staged object's bytes checked before the run's first transaction."""

import hashlib
import json
import os
import subprocess

import pytest

from conftest import PYTHONS, Host, error_line, interpreter_version, source_tree


def append_raw_entry(author, keys, number_text):
    """Append an exec entry holding a field whose JSON number is number_text, rewrite the head to name it
    and sign it: what a hostile mirror (or a stolen key) can serve as the journal's tail."""
    journal = author.journal()
    last = journal.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    previous = json.loads(last)
    entry = {"seq": previous["seq"] + 1, "prev": hashlib.sha256(last).hexdigest(), "time": previous["time"],
             "author": "alice@example", "message": "", "kind": "exec", "argv": ["/bin/true"], "cwd": "/",
             "pad": 7}
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    line = line.replace(b'"pad":7', b'"pad":' + number_text)
    with open(author.path("journal"), "ab") as f:
        f.write(line + b"\n")
    head = json.loads(open(author.path("head")).read())
    head.update(seq=entry["seq"], id=hashlib.sha256(line).hexdigest(), length=len(journal) + len(line) + 1)
    with open(author.path("head"), "w") as f:
        f.write(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")
    os.unlink(author.path("head.sig"))
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", keys.private, "-n", "isconf", author.path("head")],
                   check=True, stdin=subprocess.DEVNULL)


# The oldest and the newest interpreters: 3.6 converts a huge decimal in quadratic time, 3.11 on refuses one.
ENDS = sorted({PYTHONS[0], PYTHONS[-1]} | {p for p in PYTHONS if interpreter_version(p)[:2] == (3, 11)})


@pytest.mark.parametrize("python", ENDS, ids=lambda p: ".".join(map(str, interpreter_version(p))))
def test_a_journal_tail_holding_a_huge_number_is_refused_in_linear_time(python, author, keys, tmp_path):
    # 20 MB of digits: int() on 3.6 takes hours over it; refused before any conversion, it takes a moment.
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/first"])
    append_raw_entry(author, keys, b"1" * (20 * 1024 * 1024))
    host = Host(str(tmp_path / "host"), python=python)
    host.init(author.repo, keys)
    proc = host("up", timeout=60, expect="refused")
    line = error_line(proc)
    assert "journal from" in line and "entry 2" in line and "number longer than" in line, line
    assert "Traceback" not in proc.err
    assert not os.path.exists(host.path("/tmp/first"))  # nothing applied


@pytest.mark.parametrize("number", [b"1" * 33, b"-" + b"9" * 32, b"1." + b"0" * 31, b"1e" + b"0" * 31])
def test_a_number_longer_than_any_field_needs_is_refused_by_every_parser_of_outside_json(isconf, number):
    with pytest.raises(isconf.Refused, match="number longer than 32"):
        isconf.parse_canonical(b'{"a":' + number + b"}", "head")
    with pytest.raises(ValueError):
        isconf.parse_json(b'{"a":' + number + b"}")


def test_the_longest_numbers_the_format_writes_are_read(isconf):
    assert isconf.parse_canonical(isconf.canonical({"a": -isconf.INT_MAX - 1}), "x") == {"a": -isconf.INT_MAX - 1}
    assert isconf.parse_json(json.dumps({"s": -2.2250738585072014e-308}).encode()) == {"s": -2.2250738585072014e-308}


def test_verify_compares_a_huge_files_size_before_reading_it(author, keys, host, tmp_path, busybox_root):
    # A sparse file of 15 TiB planted at a snapped path: its size differs, so it is drift without a byte read
    # (reading its holes would take days).
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    author.commit(["--root", src, "snap", "/etc/motd"])
    busybox_root(host.root)
    host.init(author.repo, keys)
    host("up", expect="ok")
    size = 15 << 40
    while True:
        try:
            with open(host.path("/etc/motd"), "r+b") as f:
                f.truncate(size)
            break
        except OSError:   # a filesystem whose files cannot be that large: the largest it allows
            size //= 2
    assert size > 1 << 40
    proc = host("verify", "--json", timeout=60)
    assert proc.returncode == 8, proc.err
    assert json.loads(proc.out) == [{"path": "/etc/motd", "what": "content", "expected": {
        "sha256": hashlib.sha256(b"hello\n").hexdigest(), "size": 6}, "found": {"sha256": None, "size": size}}]
    assert "content differs (%d bytes, journal says 6)" % size in host("verify", timeout=60).out


def staged_then_damaged(author, keys, host, tmp_path, busybox_root):
    """A snap's object staged by a run that stopped at the failing exec before it, then damaged in place, its
    size kept; the exec now succeeds (marking /tmp/marker).  Returns the object's hash."""
    src = source_tree(tmp_path, "/etc/motd", "hello\n")
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "test -e /tmp/go && echo ran >> /tmp/marker"],
                  ["--root", src, "snap", "/etc/motd"])
    host.init(author.repo, keys)
    host("up", expect="failed")
    sha = hashlib.sha256(b"hello\n").hexdigest()
    with open(host.state("objects", sha), "r+b") as f:
        f.write(b"J")   # same size, other bytes
    open(host.path("/tmp/go"), "w").close()
    return sha


def test_a_damaged_staged_object_is_fetched_again_before_the_first_transaction(author, keys, host, tmp_path,
                                                                                  busybox_root):
    # The exec before the snap must not run again before the object's bytes are checked.
    staged_then_damaged(author, keys, host, tmp_path, busybox_root)
    host("up", expect="ok")
    with open(host.path("/etc/motd"), "rb") as f:
        assert f.read() == b"hello\n"
    with open(host.path("/tmp/marker")) as f:
        assert f.read() == "ran\n"


def test_a_damaged_staged_object_the_mirror_cannot_replace_stops_the_run_before_any_transaction(
        author, keys, host, tmp_path, busybox_root):
    sha = staged_then_damaged(author, keys, host, tmp_path, busybox_root)
    os.unlink(os.path.join(author.repo, "objects", sha))  # the mirror lost it
    proc = host("up", expect="unreachable")  # no mirror has it: as for any object missing everywhere
    assert "staged object %s is damaged" % sha[:16] in proc.err
    assert not os.path.exists(host.path("/tmp/marker"))
    assert not os.path.exists(host.path("/etc/motd"))


@pytest.mark.parametrize("text", ["1" * 100000, "0" * 19 + "5", "1." + "0" * 19])
def test_a_config_number_of_more_digits_than_any_setting_needs_is_refused_unconverted(isconf, text):
    # The config is journal-managed: its numbers come from the mirror too.
    with pytest.raises(ValueError, match="must be a number above 0"):
        isconf.parse_positive(text, int if "." not in text else float, "timeout", 10 ** 6)
