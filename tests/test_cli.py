"""The command line: help that teaches, one-line errors, documented exit codes."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from conftest import AUTHOR, ISCONF, TOP, error_line, import_isconf, run_isconf


def parser_verbs():
    """Every verb isconf's own command line defines, so that a new one is checked here too."""
    parser = import_isconf().build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(commands) == 1
    return list(commands[0].choices)


VERBS = parser_verbs()


def test_help_lists_every_verb_and_the_exit_codes():
    out = run_isconf("--help", expect="ok").out
    listed = re.findall(r"^    ([a-z][a-z-]*)(?:  |$)", out, re.M)  # the command list: a name, then its help
    assert listed == VERBS
    assert "4 refused" in out and "6 busy" in out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    assert "usage: isconf %s" % verb in run_isconf(verb, "--help", expect="ok").out


@pytest.mark.parametrize("args,code,fragment", [
    (["frobnicate"], "usage", "invalid choice"),
    (["up", "--bogus"], "usage", "unrecognized arguments: --bogus (see 'isconf up --help')"),
    (["skip", "notanumber", "-m", "x"], "usage", "invalid int value"),
    (["skip", "1"], "usage", "-m"),
    (["skip", "1", "-m", ""], "usage", "needs a reason"),
    (["lock"], "usage", "-m"),
    (["--repo", "/nonexistent", "--branch", "web", "lock", "-m", "x"], "state", "not an isconf repository"),
    (["--repo", "/tmp", "--branch", "bad/name", "lock", "-m", "x"], "usage", "branch name"),
    (["init", "ftp://example/", "--branch", "web", "--insecure"], "usage", "not an http://"),
    (["init", "http://example/", "--insecure"], "usage", "needs --branch"),
    (["init", "http://example/", "--branch", "web"], "usage", "--signers FILE"),
    (["init", "http://example/", "--branch", "web", "--insecure", "--var", "1BAD=x"], "usage", "NAME=VALUE"),
    (["init", "http://example/", "--branch", "web", "--insecure", "--var", "ISCONF_SEQ=9"], "usage", "reserved"),
    (["up", "--now", "yesterday"], "usage", "not a UTC time"),
    (["ci", "--unsigned", "--expires", "soon"], "usage", "duration"),
    (["ci"], "usage", "needs a signing key"),
    (["sign", "--unsigned"], "usage", "unrecognized arguments: --unsigned (see 'isconf sign --help')"),
    (["--bogus", "status"], "usage", "unrecognized arguments: --bogus (see 'isconf --help')"),
])
def test_bad_input_gets_one_line_and_its_exit_code(args, code, fragment, tmp_path):
    # A host root exists with a config, so only the argument itself can be wrong.
    root = str(tmp_path / "root")
    os.makedirs(root)
    run_isconf("--root", root, "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    repo = str(tmp_path / "repo")
    run_isconf("init-repo", repo, expect="ok")
    env = {"ISCONF_REPO": repo, "ISCONF_BRANCH": "web"}
    proc = run_isconf("--root", root, *args, env=env, expect=code)
    assert fragment in error_line(proc) and len(proc.err.strip().splitlines()) == 1


def test_commands_on_an_uninitialised_host_say_to_run_init(tmp_path):
    for verb in ("up", "status", "log"):
        proc = run_isconf("--root", str(tmp_path), verb, expect="state")
        assert "isconf init" in error_line(proc)


def test_unreachable_repository_exits_3(tmp_path):
    root = str(tmp_path)
    run_isconf("--root", root, "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", "--retries", "1",
               expect="ok")
    assert "no mirror could be reached" in error_line(run_isconf("--root", root, "up", expect="unreachable"))


def test_status_exits_1_while_the_host_is_halted(author, server, keys, host, busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/false"])
    host.init(server.url, keys)
    host("status", expect="ok")
    host("up", expect="failed")
    assert "FAILED:       seq 1 exec /bin/false" in host("status", expect="failed").out


def test_a_failing_reboot_command_is_reported(author, server, keys, host):
    author.commit(["reboot"])
    host.init(server.url, keys, "--reboot-command", "/bin/false")
    assert "reboot by hand" in error_line(host("up", "-r", expect="state"))


def test_migrate_keeps_the_comments_of_the_config(author, server, keys, host, busybox_root):
    author.commit(["reboot"])
    author("fork", "canary", "--sign", keys.private)
    host.init(server.url, keys)
    with open(host.path("/etc/isconf/isconf.conf"), "a") as f:
        f.write("# rack 12, ask Dana before changing\n")
    host("migrate", "canary", expect="ok")
    text = open(host.path("/etc/isconf/isconf.conf")).read()
    assert "branch = canary" in text and "# rack 12, ask Dana" in text


def test_fork_of_a_branch_that_does_not_exist_is_refused(author):
    assert "does not exist" in error_line(author("fork", "new", "--unsigned", expect="usage"))


def test_snap_of_a_name_that_is_not_utf8_is_refused(author, tmp_path):
    root = tmp_path / "src"
    os.makedirs(str(root / "etc"))
    with open(os.path.join(os.fsencode(str(root)), b"etc/caf\xe9"), "w") as f:
        f.write("x")
    author("lock", "-m", "x")
    proc = subprocess.run([sys.executable, "-I", ISCONF, "--repo", author.repo, "--branch", "web", "--root",
                           str(root), "snap", b"/etc/caf\xe9"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={"ISCONF_AUTHOR": AUTHOR, "PATH": os.environ["PATH"]})
    assert proc.returncode == 2 and b"not valid UTF-8" in proc.stderr


def test_log_into_a_closed_pipe_is_not_an_error(author, server, keys, host):
    # Far more output than a pipe buffer holds (64 KiB), so the pipe really breaks under 'head -1'.
    author.commit(*[["reboot", "-m", "long message %d " % i + "x" * 4000] for i in range(40)])
    host.init(server.url, keys)
    host("up", expect="reboot")
    pipeline = subprocess.run("%s -I %s --root %s log | head -1; exit ${PIPESTATUS[0]}" % (sys.executable, ISCONF,
                                                                                          host.root),
                              shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, executable="/bin/bash",
                              env={"PATH": os.environ["PATH"]})
    assert pipeline.stdout.count(b"\n") == 1 and pipeline.stderr == b""
    assert pipeline.returncode == 0


@pytest.mark.parametrize("line", ["deadline = inf", "timeout = nan", "retries = 0", "reboot_command = 'unclosed",
                                  "BAD NAME = x"])
def test_a_bad_config_value_is_one_line_and_exit_7(line, tmp_path):
    root = str(tmp_path)
    run_isconf("--root", root, "init", "http://127.0.0.1:1/", "--branch", "web", "--insecure", expect="ok")
    conf = os.path.join(root, "etc/isconf/isconf.conf")
    with open(conf) as f:
        text = f.read()
    section = "[env]" if line.startswith("BAD") else "[isconf]"
    with open(conf, "w") as f:
        f.write(text.replace(section, section + "\n" + line, 1))
    assert "config" in error_line(run_isconf("--root", root, "up", expect="state"))


def test_make_test_names_a_missing_package_first(tmp_path):
    # With nothing on PATH, ssh-keygen cannot be found: make says which package to install, before any test.
    proc = subprocess.run(["/usr/bin/make", "-s", "-C", os.path.dirname(ISCONF), "tools"],
                          env={"PATH": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 2  # make's own code for a recipe that failed
    first = proc.stdout.decode().splitlines()[0]
    assert first.startswith("make test: missing packages: ") and "openssh-client" in first.split()


def test_up_into_a_closed_pipe_still_applies_every_transaction(author, server, keys, host, busybox_root):
    # 'isconf up | head' must not stop a run half-way: output after the pipe closes is dropped, the logs keep it.
    busybox_root(host.root)
    author.commit(*[["exec", "--no-run", "--", "/bin/sh", "-c",
                     "/bin/busybox yes %d | /bin/busybox head -c 200000; touch /tmp/done%d" % (i, i)]
                    for i in range(3)])
    host.init(server.url, keys)
    pipeline = subprocess.run("%s -I %s --root %s up | head -c 100 >/dev/null; exit ${PIPESTATUS[0]}"
                              % (sys.executable, ISCONF, host.root), shell=True, stderr=subprocess.PIPE,
                              executable="/bin/bash", env={"PATH": os.environ["PATH"]})
    assert pipeline.returncode == 0 and pipeline.stderr == b""
    assert all(os.path.exists(host.path("/tmp/done%d" % i)) for i in range(3))
    assert host.status()["applied_seq"] == 3


def verb_parsers(isconf):
    parser = isconf.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_option_has_help_that_gives_its_default(isconf):
    parser, verbs = verb_parsers(isconf)
    global_dests = set(a.dest for a in isconf.global_options(suppress=False)._actions)
    missing = []
    for name, p in [("isconf", parser)] + sorted(verbs.items()):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if name != "isconf" and action.help == argparse.SUPPRESS and action.dest in global_dests:
                continue  # a global option after the verb: its help is isconf's own, checked there
            text = action.help or ""
            takes_value = action.option_strings and action.nargs != 0
            if not text or (takes_value and "default" not in text and "required" not in text):
                missing.append("%s %s: %r" % (name, "/".join(action.option_strings) or action.dest, text))
    assert not missing, "\n".join(missing)


def test_every_verbs_help_ends_with_an_example(isconf):
    _, verbs = verb_parsers(isconf)
    for name in verbs:
        proc = run_isconf(name, "--help", expect="ok")
        tail = proc.out.rstrip("\n").split("\nexample:\n")
        assert len(tail) == 2, (name, proc.out)
        assert all(line.startswith("  isconf ") or line.startswith("      ") for line in tail[1].splitlines()), \
            (name, tail[1])


@pytest.mark.parametrize("shape", ["--root R status --json", "--root=R status --json", "status --root R --json",
                                   "--debug --root R status --json", "-q --root R status --json",
                                   "--ro R status --json", "status --json --root R --no-mounts --debug -q",
                                   "status --repo /nonexistent --branch web --root=R --json"])
def test_global_options_before_or_after_the_verb_however_spelled(shape, server, keys, host):
    # Only the named verb's parser is built; an option argparse could read otherwise builds them all.
    host.init(server.url, keys)
    proc = run_isconf(*[host.root if a == "R" else a.replace("=R", "=" + host.root) for a in shape.split()],
                      expect="ok")
    assert '"applied_seq": 0' in proc.out


@pytest.mark.parametrize("verb", [["up"], ["up", "--dry-run"], ["status"], ["log"], ["verify"], ["disable", "-m", "x"],
                                  ["install"]])
def test_a_host_verb_given_another_branch_is_refused_never_run_on_the_hosts_own(verb, author, server, keys, host,
                                                                                 busybox_root):
    busybox_root(host.root)
    author.commit(["exec", "--no-run", "--", "/bin/touch", "/ran"])
    host.init(server.url, keys)
    said = error_line(host("--branch", "web-canary", *verb, expect="usage"))
    assert "this host follows branch web, not web-canary" in said and "'isconf migrate web-canary'" in said, said
    assert not os.path.exists(host.path("/ran")) and not os.path.exists(host.state("disabled"))
    assert not os.path.exists(host.state("last-run"))
    host("--branch", "web", "up", expect="ok")  # its own branch, named: no error
    assert os.path.exists(host.path("/ran"))


@pytest.mark.parametrize("how", ["option", "environment"])
@pytest.mark.parametrize("verb", [["init", "http://127.0.0.1:1/", "--branch", "web", "--insecure"], ["status"],
                                  ["up"], ["install"]])
def test_an_empty_root_is_refused_never_taken_for_the_current_directory(how, verb, tmp_path):
    # 'isconf --root "$TARGET" init ...' with TARGET unset made a host of whatever directory the shell was in.
    args = ["--root", ""] if how == "option" else []
    env = {"PATH": os.environ["PATH"], "ISCONF_ROOT": ""} if how == "environment" else {"PATH": os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-I", ISCONF] + args + verb, cwd=str(tmp_path), env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 2, proc.stderr
    assert b"--root (or ISCONF_ROOT) is empty: give the host's root directory, / for this machine" in proc.stderr
    assert os.listdir(str(tmp_path)) == []


GLOBAL_OPTION = re.compile(r"^\s+(-q, )?--(root|config|repo|no-mounts|quiet|debug|branch)\b", re.M)
HELP_EXIT_CODE = re.compile(r"^ *([0-9]+|128\+N) ([a-z-]+): (.+)$")


def help_exit_codes(out):
    """The (code, result, meaning) rows of a --help's 'exit codes' block, in order; 128+N as 128."""
    block = out.split("\nexit codes:\n")[1].split("\n\n")[0].splitlines()
    rows = [HELP_EXIT_CODE.match(line) for line in block]
    assert all(rows), block
    return [(128 if m.group(1) == "128+N" else int(m.group(1)), m.group(2), m.group(3)) for m in rows]


@pytest.mark.parametrize("verb", VERBS)
def test_each_verbs_help_lists_its_options_then_points_to_the_global_ones_then_its_exit_codes(verb, isconf):
    out = run_isconf(verb, "--help", expect="ok").out
    own = [a for a in verb_parsers(isconf)[1][verb]._actions if a.help != argparse.SUPPRESS]
    assert all(any(s in out for s in a.option_strings or [a.metavar or a.dest]) for a in own), out
    assert not GLOBAL_OPTION.search(out), out
    assert "[--root" not in out and "[-q]" not in out and "[--debug]" not in out  # nor in the usage line
    pointers = [line for line in out.splitlines() if "isconf --help" in line]
    assert len(pointers) == 1 and pointers[0].startswith("global options (--root, "), out
    last_option = max(out.index("\n  " + (a.option_strings or [a.metavar or a.dest])[0]) for a in own)
    assert last_option < out.index(pointers[0]) < out.index("\nexit codes:\n") < out.index("\nexample:\n")
    codes = [code for code, _, _ in help_exit_codes(out)]
    assert codes == sorted(codes) and {0, 2, 7, 70, 128} <= set(codes), codes


def test_every_exit_code_a_help_lists_is_a_row_of_the_one_table(isconf):
    table = list(isconf.EXIT_CODES)
    assert run_isconf("--help", expect="ok").out.count("\nexit codes:\n") == 1
    assert help_exit_codes(run_isconf("--help", expect="ok").out) == table  # isconf's own --help: all of them
    for verb in VERBS:
        listed = help_exit_codes(run_isconf(verb, "--help", expect="ok").out)
        assert all(row in table for row in listed), (verb, listed)
    constants = set(v for k, v in vars(isconf).items() if k.startswith("EXIT_") and isinstance(v, int))
    assert constants == set(code for code, _, _ in table)  # a new EXIT_ constant needs its row
    assert len(set(code for code, _, _ in table)) == len(table)


def test_readme_exit_codes_table_lists_the_codes_of_the_code(isconf):
    with open(os.path.join(TOP, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Exit codes\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| ([0-9][0-9, ]*) \| (.+) \|$", section, re.M)
    readme = [int(code) for codes, _ in rows for code in codes.split(",")]
    assert len(readme) == len(set(readme))
    signals = [code for code in readme if code > isconf.EXIT_SIGNAL]
    table = dict((code, meaning) for code, _, meaning in isconf.EXIT_CODES)
    assert set(readme) - set(signals) == set(table) - {isconf.EXIT_SIGNAL}
    assert signals and all(str(code) in table[isconf.EXIT_SIGNAL] for code in signals)
