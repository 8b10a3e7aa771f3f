"""The host config: init --force keeps what it is not told, and a config that does not read is refused by line."""

import json
import os
import subprocess

import pytest

from conftest import PYTHONS, Keys, error_line, import_isconf

CONF = "/etc/isconf/isconf.conf"
SIGNERS = "/etc/isconf/allowed_signers"


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def config(host):
    """The host's config as the agent's own reader takes it."""
    isconf = import_isconf()
    path = host.path(CONF)
    return isconf.Config(path, read(path, "rb"))


def fingerprint(public):
    """The key's SHA256 fingerprint as ssh-keygen prints it."""
    return subprocess.run(["ssh-keygen", "-lf", public], stdout=subprocess.PIPE, check=True).stdout.split()[1].decode()


def configured(host, server, author, keys, *extra):
    """A host with two mirrors, two variables and two options."""
    host("init", server.url, author.repo, "--branch", "web", "--signers", keys.signers, "--var", "SITE=fra1",
         "--var", "NTP=10.0.0.1", "--timeout", "7", "--retries", "2", *extra, expect="ok")


def test_init_force_with_one_option_keeps_the_variables_options_mirrors_and_keys(author, server, keys, host,
                                                                                 busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/sh", "-c", "echo $SITE $NTP > /tmp/site"])
    configured(host, server, author, keys)
    signers = read(host.path(SIGNERS), "rb")
    host("init", "--force", "--retries", "5", expect="ok")
    kept = config(host)
    assert (kept.branch, kept.urls, kept.env) == ("web", [server.url, author.repo], {"SITE": "fra1",
                                                                                      "NTP": "10.0.0.1"})
    assert (kept.timeout, kept.retries, kept.insecure) == (7.0, 5, False)
    assert read(host.path(SIGNERS), "rb") == signers  # no --signers: the trusted keys as they were
    host("up", expect="ok")  # signatures still checked against the kept keys
    assert read(host.path("/tmp/site")) == "fra1 10.0.0.1\n"


def test_init_force_sets_the_variables_and_mirrors_given_and_keeps_insecure(host):
    host("init", "http://127.0.0.1:1/", "http://127.0.0.1:2/", "--branch", "web", "--insecure", "--var", "A=1",
         "--var", "B=2", expect="ok")
    host("init", "--force", "http://127.0.0.1:3/", "--var", "B=3", "--var", "C=4", expect="ok")
    kept = config(host)
    assert (kept.urls, kept.env, kept.insecure) == (["http://127.0.0.1:3/"], {"A": "1", "B": "3", "C": "4"}, True)


def test_init_force_reset_starts_from_nothing_and_warns_what_it_drops(author, server, keys, host):
    configured(host, server, author, keys)
    proc = host("init", "--force", "--reset", server.url, "--branch", "web", "--signers", keys.signers,
                "--var", "SITE=fra2", expect="ok")
    warnings = [line for line in proc.err.splitlines() if line.startswith("isconf: warning: ")]
    assert len(warnings) == 1, proc.err
    assert ("--reset drops from %s: variable NTP; option timeout = 7; option retries = 2; mirror %s"
            % (host.path(CONF), author.repo)) in warnings[0]
    fresh = config(host)
    assert (fresh.urls, fresh.env, fresh.timeout, fresh.retries) == ([server.url], {"SITE": "fra2"}, 30.0, 3)


def test_init_force_of_a_config_that_does_not_read_is_exit_7_and_reset_replaces_it(author, server, keys, host):
    configured(host, server, author, keys)
    with open(host.path(CONF), "a") as f:
        f.write("[isconf2]\n")
    assert "unknown section [isconf2]" in error_line(host("init", "--force", "--retries", "5", expect="state"))
    proc = host("init", "--force", "--reset", server.url, "--branch", "web", "--signers", keys.signers, expect="ok")
    assert "--reset replaces a config that could not be read" in proc.err
    assert config(host).urls == [server.url]


def test_init_force_refuses_a_branch_change_on_a_host_that_fetched_and_points_to_migrate(author, server, keys,
                                                                                         host):
    author.commit(["reboot"])
    host.init(server.url, keys)
    host("up", expect="reboot")  # fetched, nothing applied
    author("fork", "canary", "--sign", keys.private)
    before = read(host.path(CONF), "rb")
    line = error_line(host("init", "--force", "--branch", "canary", "--retries", "5", expect="usage"))
    assert "follows branch web and has fetched its journal" in line and "'isconf migrate canary'" in line, line
    assert read(host.path(CONF), "rb") == before
    report = host.status()
    assert (report["branch"], report["head_seq"], report["pending"]) == ("web", 1, 1)
    host("migrate", "canary", expect="ok")
    assert host.status()["branch"] == "canary"


def test_init_force_refuses_a_branch_change_on_a_host_that_applied(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    host.init(server.url, keys)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("up", expect="ok")
    author("fork", "canary", "--sign", keys.private)
    line = error_line(host("init", "--force", "--branch", "canary", expect="usage"))
    assert "has applied through seq 1" in line and "'isconf migrate canary'" in line, line
    report = host.status()
    assert (report["branch"], report["applied_seq"], report["pending"]) == ("web", 1, 0)
    host("up", expect="ok")


def test_init_force_changes_a_branch_never_fetched(author, server, keys, host, busybox_root):
    # A mistyped branch, corrected before the first fetch: nothing to keep coherent.
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, "--branch", "wbe", "--signers", keys.signers, expect="ok")
    host("init", "--force", "--branch", "web", expect="ok")
    host("up", expect="ok")
    assert host.status()["applied_seq"] == 1


def test_init_force_with_signers_warns_naming_the_keys_added_and_removed(author, server, keys, host, tmp_path):
    host.init(server.url, keys)
    bob = Keys(str(tmp_path / "bob"), principal="bob@example")
    proc = host("init", "--force", "--signers", bob.signers, expect="ok")
    warnings = [line for line in proc.err.splitlines() if line.startswith("isconf: warning: ")]
    assert len(warnings) == 1, proc.err
    assert ("trusted keys in %s replaced by --signers: added bob@example %s (ED25519); removed %s %s (ED25519)"
            % (host.path(SIGNERS), fingerprint(bob.public), read(keys.signers).split()[0],
               fingerprint(keys.public))) in warnings[0], warnings[0]
    assert read(host.path(SIGNERS), "rb") == read(bob.signers, "rb")
    # The same keys again: nothing to warn about.
    assert "warning" not in host("init", "--force", "--signers", bob.signers, expect="ok").err


BASE = "[isconf]\nbranch = web\nurls = http://127.0.0.1:1/\ninsecure = yes\n%s\n[env]\nSITE = fra1\n"

# (the text at line 5, or a whole file; what the error says after 'isconf.conf line N: ')
TYPOS = [
    ("retires = 5", "line 5: unknown key 'retires' in [isconf]; did you mean 'retries'?"),
    ("Timeout = 5", "line 5: unknown key 'Timeout' in [isconf]; did you mean 'timeout'?"),
    ("colour = blue", "line 5: unknown key 'colour' in [isconf]; the valid ones are 'branch', 'urls'"),
    ("[isconff]\nretries = 5", "line 5: unknown section [isconff]; did you mean [isconf]?"),
    ("[Env]\nA = 1", "line 5: unknown section [Env]; did you mean [env]?"),
    ("[DEFAULT]\nretries = 5", "line 5: unknown section [DEFAULT]; the valid ones are [isconf], [env]"),
    (BASE.replace("insecure = yes", "insecure = maybe") % "",
     "line 4: insecure 'maybe' must be yes, true or 1, or no, false or 0"),
    ("retries = 101", "line 5: retries must be a number above 0 and at most 100, not '101'"),
    ("timeout = soon", "line 5: timeout must be a number"),
    ("exec_umask = 999", "line 5: exec_umask '999' must be a umask in octal"),
    ("retries = 2\nretries = 3", "line 6: key 'retries' appears twice in [isconf]"),
    (BASE % "" + "2SITE = x\n", "line 8: variable '2SITE' must have a shell-style name"),
    (BASE % "" + "ISCONF_SEQ = 1\n", "line 8: variable 'ISCONF_SEQ' must have a shell-style name, not ISCONF_*"),
    ("just words", "line 5: not KEY = VALUE, a [section] nor a comment"),
    (BASE.replace("http://127.0.0.1:1/", "http://127.0.0.1:1/\n    ftp://127.0.0.1/isconf/") % "",
     "line 3: mirror 'ftp://127.0.0.1/isconf/' is not an http://, https:// or file:// URL or an absolute directory"),
    (BASE.replace("http://127.0.0.1:1/", "srv/isconf") % "", "line 3: mirror 'srv/isconf' is not an http://"),
]


@pytest.fixture
def insecure_host(host):
    host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    return host


@pytest.mark.parametrize("verb", ["up", "status", "verify"])
@pytest.mark.parametrize("text,said", TYPOS, ids=[said.split(":")[1].strip()[:40] for _, said in TYPOS])
def test_a_config_typo_is_exit_7_naming_its_line_and_the_nearest_valid_key(insecure_host, verb, text, said):
    with open(insecure_host.path(CONF), "w") as f:
        f.write(text if text.startswith("[isconf]") else BASE % text)
    line = error_line(insecure_host(verb, expect="state"))
    assert ("config %s %s" % (insecure_host.path(CONF), said)) in line, line


@pytest.mark.parametrize("blank", [" ", "\t", "\u3000"])
def test_a_config_line_of_a_long_run_of_blanks_is_refused_before_it_is_parsed(insecure_host, blank):
    # configparser's KEY = VALUE pattern takes time quadratic in such a run: on Python 3.6 a line of a third of a
    # megabyte of spaces held every verb for hours.
    with open(insecure_host.path(CONF), "a") as f:
        f.write("SITE" + blank * 300000 + "x = 1\n")
    proc = insecure_host("status", python=PYTHONS[0], expect="state", timeout=60)
    assert ("config %s line 9: more than 64 blanks in a row before its '=': not KEY = VALUE"
            % insecure_host.path(CONF)) in error_line(proc)
    with open(insecure_host.path(CONF), "w") as f:
        f.write(BASE % "" + "RACK" + " " * 64 + "= aligned" + " " * 64 + "and spaced\n")
    assert config(insecure_host).env == {"SITE": "fra1", "RACK": "aligned" + " " * 64 + "and spaced"}


def test_a_valid_config_written_by_hand_is_taken_whole(insecure_host):
    with open(insecure_host.path(CONF), "w") as f:
        f.write("# rack 12\n[isconf]\nbranch = web\nurls = http://127.0.0.1:1/\n    http://127.0.0.1:2/\n"
                "insecure = true\n; comment\nreboot_command = /bin/true now\ntimeout = 5\ndeadline = 60\n"
                "retries = 1\nexec_timeout = 30\nexec_umask = 027\nboot_wait = 10\ninterrupted_max = 2\n"
                "metrics = /var/lib/node_exporter/isconf.prom\n\n[env]\nSite_1 = fra1\n")
    report = json.loads(insecure_host("status", "--json", expect="ok").out)
    assert report["branch"] == "web" and report["insecure"] is True
    kept = config(insecure_host)
    assert (kept.urls, kept.exec_umask, kept.env) == (["http://127.0.0.1:1/", "http://127.0.0.1:2/"], 0o27,
                                                      {"Site_1": "fra1"})


@pytest.mark.parametrize("option", [["--retries", "101"], ["--exec-umask", "999"], ["--timeout", "soon"],
                                    ["--var", "2SITE=x"], ["--var", "ISCONF_SEQ=1"]])
def test_init_refuses_a_bad_value_on_its_command_line(insecure_host, option):
    before = read(insecure_host.path(CONF))
    insecure_host("init", "--force", *option, expect="usage")
    assert read(insecure_host.path(CONF)) == before


def test_init_force_keeps_a_variable_on_several_lines_and_a_byte_order_mark_is_no_error(host):
    host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    with open(host.path(CONF), "rb") as f:
        text = f.read()
    with open(host.path(CONF), "wb") as f:   # as an editor may leave it: a BOM, a value continued below
        f.write(b"\xef\xbb\xbf" + text + b"MOTD = first line\n    second line\n")
    host("status", expect="ok")
    host("init", "--force", "--timeout", "20", expect="ok")
    kept = config(host)
    assert (kept.env["MOTD"], kept.timeout) == ("first line\nsecond line", 20.0)
    host("status", expect="ok")   # what init --force wrote reads back


def test_the_init_a_host_is_told_to_run_works_on_that_host(author, server, keys, host):
    # A host that has a config is told 'init --force ...': a plain 'init' there refuses, config exists.
    author.commit(["exec", "--no-run", "--", "/bin/true"])
    host("init", server.url, "--branch", "web", "--insecure", expect="ok")
    warning = [l for l in host("up", "--dry-run", expect="pending").err.splitlines() if "insecure mode" in l][0]
    assert "Run 'isconf init --force --signers FILE' to fix." in warning, warning
    host("init", "--force", "--signers", keys.signers, expect="ok")
    os.unlink(host.path(SIGNERS))
    line = error_line(host("up", expect="state"))
    assert line.endswith("no trusted keys at %s; run 'isconf init --force --signers FILE' (or --insecure)"
                         % host.path(SIGNERS)), line
    host("init", "--force", "--signers", keys.signers, expect="ok")
    for text, said in [("[isconf]\nbranch = web\n", "no mirror (urls) in [isconf]"),
                       ("[isconf]\nurls = %s\n" % server.url, "no branch in [isconf]"),
                       ("[env]\nA = 1\n", "no [isconf] section")]:
        with open(host.path(CONF), "w") as f:
            f.write(text)
        line = error_line(host("status", expect="state"))
        assert line == ("isconf: error: config %s: %s; fix the file, or write it anew with 'isconf init --force "
                        "--reset'" % (host.path(CONF), said)), line
    host("init", "--force", "--reset", server.url, "--branch", "web", "--signers", keys.signers, expect="ok")
    host("up", "--dry-run", expect="pending")


def test_init_force_changing_what_the_units_hold_says_to_install_again(systemd_root, tmp_path):
    # The boot unit's TimeoutStartSec is boot_wait + 3600 s, its RequiresMountsFor= the file-share mirrors:
    # a changed config left them as they were, the boot run killed before its longer wait ended.
    host = systemd_root
    host("init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    host("install", expect="ok")
    assert "warning" not in host("init", "--force", "--retries", "5", expect="ok").err
    units = [host.path("/etc/systemd/system/isconf.service"), host.path("/etc/systemd/system/isconf-update.service")]
    for change in (["--boot-wait", "7200"], [str(tmp_path / "share")]):
        warnings = [l for l in host("init", "--force", *change, expect="ok").err.splitlines() if "warning" in l]
        assert warnings == ["isconf: warning: %s differ from what 'isconf install' writes for this config "
                            "(boot_wait, file-share mirrors): run 'isconf install' again" % ", ".join(units)], warnings
        host("install", expect="ok")
        assert "warning" not in host("init", "--force", *change, expect="ok").err
    with open(units[0]) as f:
        unit = f.read()
    assert "TimeoutStartSec=10800\n" in unit and "RequiresMountsFor=%s\n" % (tmp_path / "share") in unit, unit
