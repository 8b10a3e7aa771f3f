"""Signature checks: RFC 8032 vectors, and ssh-keygen -Y verify as the reference, case by case."""
import base64
import hashlib
import os
import struct
import subprocess
import sys
import time

import pytest

from conftest import PYTHONS, error_line, run_isconf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import isconf as sigs  # noqa: E402  (the verifier is a section of isconf.py)

PRINCIPAL = "admin@example"

# RFC 8032 section 7.1: name, public key, message, signature (hex).
RFC8032 = [
    ("TEST 1", "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("TEST 2", "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("TEST 3", "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("TEST 1024", "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
     "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
     "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
     "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
     "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
     "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
     "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
     "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
     "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
     "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
     "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
     "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
     "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
     "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
     "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
     "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
     "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
     "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
     "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
     "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
     "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
     "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
     "c60c905c15fc910840b94c00a0b9d0",
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
    ("SHA(abc)", "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     hashlib.sha512(b"abc").hexdigest(),
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]
VECTORS = [pytest.param(*map(bytes.fromhex, v[1:]), id=v[0]) for v in RFC8032]
L = 2 ** 252 + 27742317777372353535851937790883648493


def flip(data, index, bit=1):
    data = bytearray(data)
    data[index] ^= bit
    return bytes(data)


# --- Ed25519 -------------------------------------------------------------------

@pytest.mark.parametrize("public,message,signature", VECTORS)
def test_rfc8032_vector_verifies(public, message, signature):
    assert sigs._ed25519_verify(public, message, signature)


@pytest.mark.parametrize("public,message,signature", VECTORS)
def test_rfc8032_flipped_message_fails(public, message, signature):
    altered = flip(message, 0) if message else b"\x00"
    assert not sigs._ed25519_verify(public, altered, signature)


@pytest.mark.parametrize("index", [0, 31, 32, 63])
@pytest.mark.parametrize("public,message,signature", VECTORS)
def test_rfc8032_flipped_signature_fails(public, message, signature, index):
    assert not sigs._ed25519_verify(public, message, flip(signature, index))


@pytest.mark.parametrize("public,message,signature", VECTORS)
def test_rfc8032_flipped_public_key_fails(public, message, signature):
    assert not sigs._ed25519_verify(public, message, flip(public, 5))


@pytest.mark.parametrize("public,message,signature", VECTORS)
def test_malleated_scalar_s_plus_l_is_refused(public, message, signature):
    s = int.from_bytes(signature[32:], "little") + L
    assert not sigs._ed25519_verify(public, message, signature[:32] + s.to_bytes(32, "little"))


@pytest.mark.parametrize("encoding", [
    ((2 ** 255 - 19) + 1).to_bytes(32, "little"),       # y >= p: non-canonical
    (1 | 1 << 255).to_bytes(32, "little"),              # x = 0 with sign bit set
    (2).to_bytes(32, "little"),                         # y = 2 is on no point
], ids=["y-not-canonical", "negative-zero-x", "not-on-curve"])
def test_invalid_point_encoding_is_refused(encoding):
    assert sigs._decode_point(encoding) is None


# --- ssh-keygen fixtures -------------------------------------------------------

def ssh_keygen(*args, **kwargs):
    return subprocess.run(("ssh-keygen",) + args, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **kwargs)


class SigKeys:
    """Real sig_keys and signatures made by ssh-keygen, shared by the whole session."""

    def __init__(self, root):
        self.root = str(root)
        self.message = b"journal head 42\nsha256 0123abcd\n"
        self.write("message", self.message)
        self.public = {}
        for name, args in [("ed", ("-t", "ed25519")), ("rsa", ("-t", "rsa", "-b", "3072")),
                           ("rsa1024", ("-t", "rsa", "-b", "1024"))]:
            assert ssh_keygen("-q", "-N", "", "-f", self.path(name), *args).returncode == 0
            with open(self.path(name + ".pub")) as f:
                self.public[name] = " ".join(f.read().split()[:2])
        self.sigs = {}
        for label, key, extra in [("ed", "ed", ()), ("ed256", "ed", ("-O", "hashalg=sha256")),
                                  ("rsa", "rsa", ()), ("rsa256", "rsa", ("-O", "hashalg=sha256")),
                                  ("ed-other-ns", "ed", ("-n", "other"))]:
            namespace = () if "-n" in extra else ("-n", "isconf")
            done = ssh_keygen("-Y", "sign", "-f", self.path(key), *(namespace + extra),
                              input=self.message)
            assert done.returncode == 0, done.stderr
            self.sigs[label] = done.stdout

    def path(self, name):
        return os.path.join(self.root, name)

    def write(self, name, data):
        with open(self.path(name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return self.path(name)

    def line(self, key="ed", options=""):
        return "%s %s%s\n" % (PRINCIPAL, options + " " if options else "", self.public[key])


@pytest.fixture(scope="session")
def sig_keys(tmp_path_factory):
    return SigKeys(tmp_path_factory.mktemp("sig_keys"))


def blob_of(armored):
    body = armored.decode().strip().split("\n")[1:-1]
    return base64.b64decode("".join(body))


def armour(blob):
    text = base64.b64encode(blob).decode()
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    return ("-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines)
            + "\n-----END SSH SIGNATURE-----\n").encode()


def ssh_string(data):
    return struct.pack(">I", len(data)) + data


def read_strings(data):
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def split_blob(armored):
    """SSHSIG blob as [version, key, namespace, reserved, hash, signature]."""
    blob = blob_of(armored)
    assert blob[:6] == b"SSHSIG"
    return [struct.unpack(">I", blob[6:10])[0]] + read_strings(blob[10:])


def join_blob(version, key, namespace, reserved, hash_name, signature):
    return armour(b"SSHSIG" + struct.pack(">I", version) + b"".join(
        ssh_string(x) for x in (key, namespace, reserved, hash_name, signature)))


def with_field(armored, index, value):
    fields = split_blob(armored)
    fields[index] = value
    return join_blob(*fields)


def flip_signature_byte(armored):
    blob = blob_of(armored)
    return armour(flip(blob, len(blob) - 20, 0x10))


# --- sigs.py and ssh-keygen -Y verify agree, case by case -----------------------
#
# id, signature label, listed key, options, message edit, signature edit,
# accepted?, fragment of our refusal

SAME = lambda x: x  # noqa: E731
CASES = [
    ("good-ed25519", "ed", "ed", "", SAME, SAME, True, None),
    ("good-ed25519-sha256", "ed256", "ed", "", SAME, SAME, True, None),
    ("good-rsa-sha512", "rsa", "rsa", "", SAME, SAME, True, None),
    ("good-rsa-sha256", "rsa256", "rsa", "", SAME, SAME, True, None),
    ("ed25519-message-flipped", "ed", "ed", "", lambda m: flip(m, 3), SAME, False, "does not verify"),
    ("rsa-message-flipped", "rsa", "rsa", "", lambda m: flip(m, 3), SAME, False, "does not verify"),
    ("ed25519-signature-flipped", "ed", "ed", "", SAME, flip_signature_byte, False, "does not verify"),
    ("rsa-signature-flipped", "rsa", "rsa", "", SAME, flip_signature_byte, False, "does not verify"),
    ("wrong-namespace", "ed-other-ns", "ed", "", SAME, SAME, False, "namespace 'other'"),
    ("key-not-listed", "ed", "rsa", "", SAME, SAME, False, "not in allowed_signers"),
    ("namespaces-other", "ed", "ed", 'namespaces="other"', SAME, SAME, False, "may sign only"),
    ("namespaces-list", "ed", "ed", 'namespaces="other,isconf"', SAME, SAME, True, None),
    ("namespaces-wildcard", "ed", "ed", 'namespaces="isc*"', SAME, SAME, True, None),
    ("namespaces-negated", "ed", "ed", 'namespaces="*,!isconf"', SAME, SAME, False, "may sign only"),
    ("valid-before-past", "ed", "ed", 'valid-before="20200101"', SAME, SAME, False, "expired at 2020-01-01"),
    ("valid-before-future", "ed", "ed", 'valid-before="29991231Z"', SAME, SAME, True, None),
    ("valid-after-future", "ed", "ed", 'valid-after="29990101"', SAME, SAME, False, "not valid before 2999-01-01"),
    ("valid-after-past", "rsa", "rsa", 'valid-after="20200101120000Z"', SAME, SAME, True, None),
    ("option-names-any-case", "ed", "ed", 'NAMESPACES="isconf",Valid-After="20200101"', SAME, SAME, True, None),
    ("truncated-armour", "ed", "ed", "", SAME, lambda s: s[:-40], False, "not a complete"),
    ("trailing-garbage-in-blob", "ed", "ed", "", SAME,
     lambda s: armour(blob_of(s) + b"\0\0\0\0"), False, "trailing bytes"),
    ("version-2", "ed", "ed", "", SAME, lambda s: with_field(s, 0, 2), False, "version 2"),
]
CASE_PARAMS = [pytest.param(*c[1:], id=c[0]) for c in CASES]


def prepare(sig_keys, label, listed, options, edit_message, edit_signature):
    message = edit_message(sig_keys.message)
    signature = edit_signature(sig_keys.sigs[label])
    allowed = "# trusted signers\n" + sig_keys.line(listed, options)
    return message, signature, allowed


@pytest.mark.parametrize("label,listed,options,edit_message,edit_signature,accepted,why", CASE_PARAMS)
def test_ssh_keygen_verdict(sig_keys, label, listed, options, edit_message, edit_signature, accepted, why):
    message, signature, allowed = prepare(sig_keys, label, listed, options, edit_message, edit_signature)
    done = ssh_keygen("-Y", "verify", "-f", sig_keys.write("allowed", allowed), "-I", PRINCIPAL,
                      "-n", "isconf", "-s", sig_keys.write("sig", signature), input=message)
    assert (done.returncode == 0) == accepted, done.stderr


@pytest.mark.parametrize("label,listed,options,edit_message,edit_signature,accepted,why", CASE_PARAMS)
def test_sigs_verdict(sig_keys, label, listed, options, edit_message, edit_signature, accepted, why):
    message, signature, allowed = prepare(sig_keys, label, listed, options, edit_message, edit_signature)
    signers = sigs.parse_allowed_signers(allowed)
    if accepted:
        assert sigs.verify_signature(message, signature, signers) == signers[0]
    else:
        with pytest.raises(sigs.Refused, match=why):
            sigs.verify_signature(message, signature, signers)


# find-principals checks only trust and dates, not the signature or namespaces.
TRUST_CASES = [c for c in CASES if c[0] in (
    "good-ed25519", "good-rsa-sha512", "key-not-listed", "valid-before-past",
    "valid-before-future", "valid-after-future", "valid-after-past")]


@pytest.mark.parametrize("label,listed,options,edit_message,edit_signature,accepted,why",
                         [pytest.param(*c[1:], id=c[0]) for c in TRUST_CASES])
def test_find_principals_verdict(sig_keys, label, listed, options, edit_message, edit_signature, accepted, why):
    _, signature, allowed = prepare(sig_keys, label, listed, options, edit_message, edit_signature)
    done = ssh_keygen("-Y", "find-principals", "-f", sig_keys.write("allowed", allowed),
                      "-s", sig_keys.write("sig", signature))
    assert (done.stdout.decode().split() == [PRINCIPAL]) == accepted


def test_malleated_ed25519_scalar_is_refused_though_ssh_keygen_accepts(sig_keys):
    """Known, deliberate divergence: OpenSSH reduces S mod L, RFC 8032 refuses S >= L."""
    fields = split_blob(sig_keys.sigs["ed"])
    algorithm, raw = read_strings(fields[5])
    s = int.from_bytes(raw[32:], "little") + L
    fields[5] = ssh_string(algorithm) + ssh_string(raw[:32] + s.to_bytes(32, "little"))
    signature = join_blob(*fields)
    done = ssh_keygen("-Y", "verify", "-f", sig_keys.write("allowed", sig_keys.line()), "-I", PRINCIPAL,
                      "-n", "isconf", "-s", sig_keys.write("sig", signature), input=sig_keys.message)
    assert done.returncode == 0
    with pytest.raises(sigs.Refused, match="does not verify"):
        sigs.verify_signature(sig_keys.message, signature, sigs.parse_allowed_signers(sig_keys.line()))


@pytest.mark.parametrize("verify_time,accepted", [
    ("20240701045959Z", False), ("20240701050000Z", True)])
def test_local_valid_after_matches_ssh_keygen_in_summer(sig_keys, monkeypatch, verify_time, accepted):
    """Without Z the date is local, via mktime() with tm_isdst = 0: in New York in
    July, midnight "standard time" is 05:00 UTC, not 04:00."""
    allowed = sig_keys.line(options='valid-after="20240701"')
    done = ssh_keygen("-Y", "verify", "-f", sig_keys.write("allowed", allowed), "-I", PRINCIPAL,
                      "-n", "isconf", "-s", sig_keys.write("sig", sig_keys.sigs["ed"]),
                      "-O", "verify-time=" + verify_time, input=sig_keys.message,
                      env=dict(os.environ, TZ="America/New_York"))
    assert (done.returncode == 0) == accepted
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        signers = sigs.parse_allowed_signers(allowed)
    finally:
        monkeypatch.undo()
        time.tzset()
    now = sigs._parse_timestamp(verify_time, "test")
    if accepted:
        assert sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"], signers, now=now)
    else:
        with pytest.raises(sigs.Refused, match="not valid before 2024-07-01 05:00:00 UTC"):
            sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"], signers, now=now)


# --- distinct refusals for forged or odd signatures -------------------------------

def refusal(sig_keys, signature, allowed=None, namespace="isconf", now=None, message=None):
    signers = sigs.parse_allowed_signers(allowed or sig_keys.line("ed") + sig_keys.line("rsa"))
    with pytest.raises(sigs.Refused) as caught:
        sigs.verify_signature(sig_keys.message if message is None else message, signature,
                              signers, namespace=namespace, now=now)
    return str(caught.value)


@pytest.mark.parametrize("edit,fragment", [
    (lambda s: b"junk\n" + s, "not a complete"),
    (lambda s: s + b"junk\n", "not a complete"),
    (lambda s: s.replace(b"-----END", b"-----FIN"), "not a complete"),
    (lambda s: s.replace(s.split(b"\n")[1][:4], b"A*AA"), "not a complete"),
    (lambda s: s.replace(s.split(b"\n")[1][:4], b"A=AA"), "invalid base64"),
    (lambda s: armour(b"SSHSIH" + blob_of(s)[6:]), "does not start with SSHSIG"),
    (lambda s: armour(blob_of(s)[:-10]), "runs past its end"),
    (lambda s: with_field(s, 3, b"x"), "reserved field"),
    (lambda s: with_field(s, 4, b"sha1"), "uses hash 'sha1'"),
], ids=["junk-before", "junk-after", "no-end-line", "bad-character", "bad-padding",
        "bad-magic", "truncated-blob", "reserved-used", "sha1-hash"])
def test_malformed_signature_refusal(sig_keys, edit, fragment):
    assert fragment in refusal(sig_keys, edit(sig_keys.sigs["ed"]))


def test_untrusted_key_refusal_names_its_fingerprint(sig_keys):
    fingerprint = ssh_keygen("-l", "-f", sig_keys.path("ed.pub")).stdout.decode().split()[1]
    assert fingerprint + " (ED25519)" in refusal(sig_keys, sig_keys.sigs["ed"], allowed=sig_keys.line("rsa"))


def test_namespace_argument_is_enforced(sig_keys):
    assert "not 'deploy'" in refusal(sig_keys, sig_keys.sigs["ed"], namespace="deploy")


def test_expiry_is_judged_at_the_given_time(sig_keys):
    allowed = sig_keys.line(options='valid-before="20300101Z"')
    assert "expired at 2030-01-01 00:00:00 UTC" in refusal(sig_keys, sig_keys.sigs["ed"], allowed, now=1900000000)


def test_valid_before_is_inclusive(sig_keys):
    signers = sigs.parse_allowed_signers(sig_keys.line(options='valid-before="20300101Z"'))
    assert sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"], signers, now=1893456000)


def test_valid_after_is_inclusive(sig_keys):
    signers = sigs.parse_allowed_signers(sig_keys.line(options='valid-after="20300101Z"'))
    assert sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"], signers, now=1893456000)


def test_usable_line_wins_over_expired_line_for_same_key(sig_keys):
    allowed = sig_keys.line(options='valid-before="20200101Z"') + sig_keys.line()
    signers = sigs.parse_allowed_signers(allowed, "signers")
    assert sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"], signers).source == "signers:2"


def test_sha1_rsa_signature_refused(sig_keys):
    fields = split_blob(sig_keys.sigs["rsa"])
    _, raw = read_strings(fields[5])
    fields[5] = ssh_string(b"ssh-rsa") + ssh_string(raw)
    assert "SHA-1" in refusal(sig_keys, join_blob(*fields))


def test_rsa_signature_of_wrong_length_refused(sig_keys):
    fields = split_blob(sig_keys.sigs["rsa"])
    algorithm, raw = read_strings(fields[5])
    fields[5] = ssh_string(algorithm) + ssh_string(b"\0" + raw)
    assert "does not verify" in refusal(sig_keys, join_blob(*fields))


def test_algorithm_not_matching_key_refused(sig_keys):
    fields = split_blob(sig_keys.sigs["ed"])
    _, raw = read_strings(fields[5])
    fields[5] = ssh_string(b"rsa-sha2-512") + ssh_string(raw)
    assert "does not match Ed25519 key" in refusal(sig_keys, join_blob(*fields))


def test_armour_with_crlf_accepted(sig_keys):
    signers = sigs.parse_allowed_signers(sig_keys.line())
    assert sigs.verify_signature(sig_keys.message, sig_keys.sigs["ed"].replace(b"\n", b"\r\n"), signers)


# --- allowed_signers parsing ---------------------------------------------------

@pytest.mark.parametrize("key", ["ed", "rsa"])
def test_fingerprint_matches_ssh_keygen(sig_keys, key):
    expected = ssh_keygen("-l", "-f", sig_keys.path(key + ".pub")).stdout.decode().split()[1]
    blob = base64.b64decode(sig_keys.public[key].split()[1])
    assert sigs.key_fingerprint(blob) == expected


def test_comments_and_blank_lines_skipped_and_lines_numbered(sig_keys):
    text = "# head signers\n\n   \n  # indented comment\n" + sig_keys.line("ed") + sig_keys.line("rsa")
    assert [s.source for s in sigs.parse_allowed_signers(text, "etc/signers")] == [
        "etc/signers:5", "etc/signers:6"]


def test_plain_line_fields(sig_keys):
    signer = sigs.parse_allowed_signers(sig_keys.line("ed").rstrip("\n") + " laptop key\n")[0]
    assert signer == sigs.AllowedSigner(
        [PRINCIPAL], "ssh-ed25519", base64.b64decode(sig_keys.public["ed"].split()[1]),
        None, None, None, "allowed_signers:1")


def test_quoted_principals_may_hold_spaces(sig_keys):
    line = '"admin@example,ops team" ' + sig_keys.public["ed"]
    assert sigs.parse_allowed_signers(line)[0].principals == [PRINCIPAL, "ops team"]


def test_options_parsed(sig_keys):
    line = sig_keys.line(options='namespaces="isconf,file",valid-after="20240101Z",valid-before="20250101123456Z"')
    signer = sigs.parse_allowed_signers(line)[0]
    assert (signer.namespaces, signer.valid_after, signer.valid_before) == (
        ["isconf", "file"], 1704067200, 1735734896)


def test_crlf_file_accepted(sig_keys):
    text = (sig_keys.line("ed") + sig_keys.line("rsa")).replace("\n", "\r\n")
    assert [s.key_type for s in sigs.parse_allowed_signers(text)] == ["ssh-ed25519", "ssh-rsa"]


@pytest.mark.parametrize("line,fragment", [
    pytest.param("admin@example", "expected principals", id="no-key"),
    pytest.param('"" KEY', "expected principals", id="empty-principals"),
    pytest.param("admin@example ssh-ed25519", "missing key type or base64 key", id="no-base64"),
    pytest.param("admin@example ssh-ed25519 !!!not-base64!!!", "not valid base64", id="bad-base64"),
    pytest.param("admin@example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "runs past its end", id="cut-key"),
    pytest.param("admin@example ecdsa-sha2-nistp256 AAAAE2VjZHNh", "key type ecdsa-sha2-nistp256 is not supported", id="ecdsa"),
    pytest.param("admin@example ssh-ed25519-cert-v01@openssh.com AAAA", "ssh-ed25519-cert-v01@openssh.com is not supported", id="certificate"),
    pytest.param("admin@example cert-authority KEY", "certificate authorities (cert-authority) are not supported", id="cert-authority"),
    pytest.param('admin@example foo="x" KEY', "unknown or malformed option", id="unknown-option"),
    pytest.param('admin@example namespaces="isconf KEY', "unknown or malformed option", id="unclosed-quote"),
    pytest.param('admin@example namespaces="a",namespaces="b" KEY', "namespaces is given twice", id="repeated-option"),
    pytest.param('admin@example namespaces="a", KEY', "single commas", id="trailing-comma"),
    pytest.param('admin@example namespaces="a";valid-after="20200101" KEY', "single commas", id="semicolon"),
    pytest.param('admin@example valid-after="2020" KEY', "timestamp '2020'", id="short-date"),
    pytest.param('admin@example valid-after="20200231" KEY', "timestamp '20200231'", id="february-31"),
    pytest.param('admin@example valid-after="202001011261" KEY', "timestamp '202001011261'", id="minute-61"),
    pytest.param('admin@example valid-after="19691231Z" KEY', "timestamp '19691231Z'", id="before-1970"),
    pytest.param('admin@example valid-after="20250101Z",valid-before="20240101Z" KEY', "valid-before is not after", id="window-reversed"),
    pytest.param("admin@example ssh-rsa EDKEY", "line says ssh-rsa but the key is ssh-ed25519", id="type-mismatch"),
    pytest.param("admin@example RSA1024", "RSA key has 1024 bits", id="rsa-1024"),
])
def test_malformed_line_refused_with_place(sig_keys, line, fragment):
    line = (line.replace("EDKEY", sig_keys.public["ed"].split()[1]).replace("KEY", sig_keys.public["ed"])
            .replace("RSA1024", sig_keys.public["rsa1024"]))
    with pytest.raises(sigs.Refused) as caught:
        sigs.parse_allowed_signers("# first\n" + line + "\n", "signers")
    assert str(caught.value).startswith("signers:2: ") and fragment in str(caught.value)


# --- every supported interpreter, through the real command line -------------------


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: p.split("/")[-3])
@pytest.mark.parametrize("label", ["ed", "ed256", "rsa", "rsa256"])
def test_verify_sig_command_agrees_under_every_interpreter(sig_keys, python, label):
    allowed = sig_keys.write("interp-allowed", sig_keys.line("ed") + sig_keys.line("rsa"))
    signature = sig_keys.write("interp-" + label, sig_keys.sigs[label])
    good = run_isconf("verify-sig", sig_keys.path("message"), "--signature", signature, "--signers", allowed,
                      python=python, expect="ok")
    assert "good signature by %s" % PRINCIPAL in good.out
    altered = sig_keys.write("interp-altered", sig_keys.message + b"!")
    bad = run_isconf("verify-sig", altered, "--signature", signature, "--signers", allowed,
                     python=python, expect="refused")
    assert "does not verify" in error_line(bad)


SMALL_ORDER_POINTS = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # the identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
]


@pytest.mark.parametrize("point", SMALL_ORDER_POINTS)
def test_an_ed25519_key_of_small_order_is_refused_in_allowed_signers(point, tmp_path):
    # ssh-keygen accepts these; a "signature" by such a key can be made by anyone.
    blob = ssh_string(b"ssh-ed25519") + ssh_string(bytes.fromhex(point))
    signers = tmp_path / "allowed_signers"
    signers.write_text("admin@example ssh-ed25519 %s\n" % base64.b64encode(blob).decode())
    proc = run_isconf("--root", str(tmp_path), "init", "http://127.0.0.1:1/", "--branch", "web",
                      "--signers", str(signers), expect="usage")
    assert "small order" in error_line(proc)
