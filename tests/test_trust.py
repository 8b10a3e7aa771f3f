"""Signed heads end to end: key types, flipped bytes, rotation, insecure mode, the clock."""

import base64
import os
import signal
import struct
import subprocess

import pytest

from conftest import ISCONF, Keys, error_line, source_tree


def small_journal(author, tmp_path):
    """One snap and one exec, so that a journal, an object and a command are all at stake."""
    src = source_tree(tmp_path, "/etc/motd", "signed content\n")
    author.commit(["--root", src, "snap", "/etc/motd"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/ran"])


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_journal_signed_with_each_key_type_replays(kind, keys, rsa_keys, author, tmp_path, server, host,
                                                   busybox_root):
    signing = author.keys = keys if kind == "ed25519" else rsa_keys
    busybox_root(host.root)
    small_journal(author, tmp_path)
    host.init(server.url, signing)
    host("up", expect="ok")
    assert open(host.path("/etc/motd")).read() == "signed content\n" and os.path.exists(host.path("/tmp/ran"))


def flip_at(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def object_file(author):
    objects = os.path.join(author.repo, "objects")
    return os.path.join(objects, os.listdir(objects)[0])


def at_fraction(fraction):
    return lambda data: min(len(data) - 1, int(len(data) * fraction))


def in_message(line_number):
    """The first letter of a journal entry's message ("test change"): still valid JSON once flipped."""
    def where(data):
        start = sum(len(line) + 1 for line in data.split(b"\n")[:line_number])
        return data.index(b'"message":"', start) + len(b'"message":"')
    return where


def flip_signature_blob(path, where):
    """Flip a byte of the decoded SSHSIG blob and armour it again, so that the base64 stays valid
    and the check on that part of the signature is the one that answers."""
    with open(path) as f:
        lines = f.read().splitlines()
    blob = bytearray(base64.b64decode("".join(lines[1:-1])))
    key_length = struct.unpack(">I", blob[10:14])[0]
    blob[{"key": 14 + key_length - 1, "value": len(blob) - 1}[where]] ^= 0x01
    text = base64.b64encode(bytes(blob)).decode()
    with open(path, "w") as f:
        f.write("\n".join([lines[0]] + [text[i:i + 70] for i in range(0, len(text), 70)] + [lines[-1]]) + "\n")


FILES = {"head": lambda a: a.path("head"), "head.sig": lambda a: a.path("head.sig"),
         "journal": lambda a: a.path("journal"), "object": object_file}
# Which check refuses each flip: the head's signature is checked over its exact bytes first.
FLIPS = [("head", at_fraction(f), "signature does not verify") for f in (0.0, 0.3, 0.6, 0.999)] + [
    ("object", at_fraction(f), "does not match the signed journal") for f in (0.0, 0.3, 0.6, 0.999)] + [
    ("journal", at_fraction(0.0), "entry 1 is not valid JSON"),
    ("journal", in_message(0), "entry 2: does not follow entry 1 (hash chain broken)"),
    ("journal", in_message(1), "does not end at the entry the signed head names"),
    ("journal", at_fraction(0.999), "does not end with a newline"),
    ("head.sig", at_fraction(0.0), "not a complete -----BEGIN/END SSH SIGNATURE----- block"),
    ("head.sig", at_fraction(0.999), "not a complete -----BEGIN/END SSH SIGNATURE----- block"),
    ("head.sig", "key", "which is not in allowed_signers"),
    ("head.sig", "value", "signature does not verify with key"),
]
FLIP_IDS = ["head at0%", "head at30%", "head at60%", "head at99%", "object at0%", "object at30%", "object at60%",
            "object at99%", "journal first byte", "journal entry 1", "journal last entry", "journal last newline",
            "head.sig armour", "head.sig last newline", "head.sig key", "head.sig value"]


@pytest.mark.parametrize("which,where,fragment", FLIPS, ids=FLIP_IDS)
def test_a_flipped_byte_anywhere_is_refused(which, where, fragment, author, server, keys, host, tmp_path,
                                            busybox_root):
    busybox_root(host.root)
    small_journal(author, tmp_path)
    path = FILES[which](author)
    if isinstance(where, str):
        flip_signature_blob(path, where)
    else:
        with open(path, "rb") as f:
            flip_at(path, where(f.read()))
    host.init(server.url, keys)
    before = host.snapshot()
    refused = host("up", expect="refused")
    assert fragment in error_line(refused)
    assert not os.path.exists(host.path("/etc/motd")) and not os.path.exists(host.path("/tmp/ran"))
    assert host.snapshot() == before


def test_keys_rotate_through_the_journal(author, server, keys, host, tmp_path, busybox_root):
    # Add the new key beside the old (signed with the old), sign with the new, retire the old.
    busybox_root(host.root)
    new = Keys(str(tmp_path / "newkeys"))
    late = type(host)(str(tmp_path / "late-host"))
    busybox_root(late.root)
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "etc/isconf"))
    both = os.path.join(src, "etc/isconf/allowed_signers")
    with open(keys.signers) as old_line, open(new.signers) as new_line:
        old_text, new_text = old_line.read(), new_line.read()
    with open(both, "w") as f:
        f.write(old_text + new_text)
    host.init(server.url, keys)
    late.init(server.url, keys)

    author.commit(["--root", src, "snap", "/etc/isconf/allowed_signers"], why="trust the new key")
    host("up", expect="ok")

    author.keys, author.signers = new, both  # the hosts trust both keys now
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/signed-by-new"])
    with open(both, "w") as f:
        f.write(new_text)
    author.commit(["--root", src, "snap", "/etc/isconf/allowed_signers"], why="retire the old key")
    author.signers = None  # new's own file: what the hosts trust from here on
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/signed-by-new"))
    assert open(host.path("/etc/isconf/allowed_signers")).read() == new_text

    # A host that never applied the middle step is told which key it does not trust.
    refused = late("up", expect="refused")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", new.public], stdout=subprocess.PIPE).stdout.split()[1]
    assert fingerprint.decode() in error_line(refused) and "rotation" in error_line(refused)
    assert not os.path.exists(late.path("/tmp/signed-by-new"))

    # A signature by the retired key is no longer good enough: ci refuses it before anything is published.
    journal = author.journal()
    author("lock", "-m", "sign with the retired key")
    author("exec", "--no-run", "--", "/bin/touch", "/tmp/signed-by-old")
    refused = author("ci", "--sign", keys.private, expect="usage")
    assert "hosts would refuse a head signed with" in error_line(refused), refused.err
    assert "not in allowed_signers" in error_line(refused) and author.journal() == journal


def test_unsigned_head_is_refused_by_a_host_that_has_signers(author, server, keys, host):
    author.keys = None
    author.commit(["reboot"])
    host.init(server.url, keys)
    assert "has no head.sig" in error_line(host("up", expect="refused"))


def test_insecure_host_is_warned_on_every_run(author, server, host):
    author.keys = None
    author.commit(["reboot"])
    host.init(server.url, None)
    for _ in range(2):
        assert "isconf: warning: insecure mode" in host("up", expect="reboot").err


def test_init_needs_signers_or_an_explicit_insecure(host):
    refused = host("init", "http://127.0.0.1:1/", "--branch", "web", expect="usage")
    assert "--signers" in error_line(refused)
    assert not os.path.exists(host.path("/etc/isconf/isconf.conf"))


def test_expired_head_is_refused_and_now_shows_the_way_through(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author("lock", "-m", "expiring")
    author("exec", "--no-run", "--", "/bin/touch", "/tmp/x")
    author.ci("--expires", "1d")
    host.init(server.url, keys)
    refused = host("up", "--now", "2099-01-01T00:00:00Z", expect="refused")
    assert "expired" in error_line(refused) and not os.path.exists(host.path("/tmp/x"))
    host("up", expect="ok")
    assert os.path.exists(host.path("/tmp/x"))


def test_a_host_without_a_clock_verifies_with_now(author, server, keys, host, busybox_root):
    # A key valid only from 2026 on, checked by a miniroot that thinks it is 1970.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/tmp/x"])
    keys_line = open(keys.signers).read().replace(" ssh-ed25519", ' valid-after="20260101Z" ssh-ed25519')
    signers = os.path.join(host.root, "..", "dated_signers")
    with open(signers, "w") as f:
        f.write(keys_line)
    host("init", server.url, "--branch", "web", "--signers", signers, expect="ok")
    assert "not valid before" in error_line(host("up", "--now", "1970-01-02T00:00:00Z", expect="refused"))
    host("up", "--now", "2026-11-25T00:00:00Z", expect="ok")


def test_ci_signs_with_a_key_held_by_ssh_agent(author, server, keys, host, tmp_path):
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            subprocess.run(["sleep", "0.05"])
        env = {"SSH_AUTH_SOCK": sock}
        subprocess.run(["ssh-add", "-q", keys.private], env=env, check=True, stderr=subprocess.DEVNULL)
        author("lock", "-m", "agent signing")
        author("reboot")
        author("ci", "--sign", keys.public, env=env)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
    host.init(server.url, keys)
    host("up", expect="reboot")


def test_python2_gets_one_clear_line(tmp_path):
    python2 = "/root/.pyenv/versions/2.7.18/bin/python"
    if not os.path.exists(python2):
        pytest.skip("no Python 2.7 on this machine")
    proc = subprocess.run([python2, ISCONF, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 2 and proc.stderr.startswith(b"ERROR: isconf.py needs Python 3.6")


def test_entries_signed_by_a_key_removed_since_are_not_applied(author, server, keys, host, tmp_path, busybox_root):
    # The host halted with entries pending under the old head; then its trusted keys were replaced by hand.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/false"], ["exec", "--no-run", "--", "/bin/touch", "/tmp/pwned"])
    host.init(server.url, keys)
    host("up", expect="failed")
    other = Keys(str(tmp_path / "replacement"))
    with open(host.path("/etc/isconf/allowed_signers"), "w") as f, open(other.signers) as new:
        f.write(new.read())
    host("skip", "1", "-m", "moving on", expect="ok")
    assert "not in allowed_signers" in error_line(host("up", expect="refused"))
    assert not os.path.exists(host.path("/tmp/pwned"))
