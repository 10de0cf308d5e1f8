"""AtoM's configuration read as AtoM reads it (atom_workerctl.sfyaml, atomconfig): sfYaml's scalars, PHP's
string conversion checked against the real php binary, safe file reading, and the same job prefix as the
atom_worker role computes and writes. Local: no lab host needed.
"""

import glob
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "roles/atom_worker/library"))
sys.path.insert(0, str(REPO / "roles/atom_worker/filter_plugins"))

import atom_worker as role_filters  # noqa: E402
import atom_worker_yaml_keys as role_yaml  # noqa: E402
from atom_workerctl import atomconfig, sfyaml  # noqa: E402
from atom_workerctl.errors import EXIT_ERROR  # noqa: E402

# (plain scalar as written, the PHP value sfYaml gives it, PHP's (string) of that value)
SCALARS = [
    ("", None, ""), ("~", None, ""), ("null", None, ""), ("NULL", None, ""),
    ("true", True, "1"), ("TRUE", True, "1"), ("False", False, ""),
    ("yes", "yes", "yes"), ("no", "no", "no"), ("on", "on", "on"), ("off", "off", "off"),
    ("y", "y", "y"), ("n", "n", "n"),
    ("0123", 83, "83"), ("0", 0, "0"), ("00", 0, "0"), ("089", 0, "0"), ("0128", 10, "10"),
    ("123", 123, "123"), ("99999999999999999999", "99999999999999999999", "99999999999999999999"),
    ("-12", -12.0, "-12"), ("+5", 5.0, "5"), ("1.50", 1.5, "1.5"), ("1.0", 1.0, "1"), (".5", 0.5, "0.5"),
    ("1e20", 1e20, "1.0E+20"), ("1e3", 1000.0, "1000"), ("1.5e-7", 1.5e-7, "1.5E-7"),
    ("0.30000000000000004", 0.30000000000000004, "0.3"), ("123456789012345678.5", 123456789012345678.5,
                                                          "1.2345678901235E+17"),
    ("0x1A", "0x1A", "0x1A"),  # PHP 7+'s is_numeric refuses hex: sfYaml's hexdec branch is never reached
    ("1,000.5", 1000.5, "1000.5"), ("1,000", 1000.0, "1000"), ("-1,5", -15.0, "-15"),
    (".inf", float("inf"), "INF"), ("-.inf", float("-inf"), "-INF"),
    ("2024-01-01", 1704067200, "1704067200"), ("2024-1-5 1:02:03.5 +5", 1704398523, "1704398523"),
    ("2024-01-01T10:00:00Z", 1704103200, "1704103200"), ("2024-02-30", 1709251200, "1709251200"),
    ("2024-13-01", False, ""), ("1969-12-31", -86400, "-86400"),
    ("main", "main", "main"), ("a b", "a b", "a b"), ("1_000", "1_000", "1_000"), ("inf", "inf", "inf"),
]


@pytest.mark.parametrize("text, value, string", SCALARS)
def test_plain_scalars_get_sfyamls_values(text, value, string):
    got = sfyaml.loads(f"k: {text}\n")["k"]
    assert got == value and type(got) is type(value)
    assert sfyaml.php_string(got) == string


@pytest.mark.parametrize("text", ["'0123'", '"true"', "'yes'", '"1.50"', "'~'", "''", "'2024-01-01'"])
def test_quoted_values_stay_strings(text):
    assert sfyaml.loads(f"k: {text}\n")["k"] == text[1:-1]


def test_comments_quotes_and_escapes():
    doc = sfyaml.loads(textwrap.dedent("""\
        # a comment
        a: 'it''s # not a comment'   # a comment
        b: x#y
        c: "tab \\t stays, \\"quote\\", new\\nline"
        d: !str 0123
        e: |
          kept
        f: [0123, 'b', yes, {g: 1.50}]
        0123: octal key
        true: bool key
        """))
    assert doc["a"] == "it's # not a comment"
    assert doc["b"] == "x#y"
    assert doc["c"] == 'tab \\t stays, "quote", new\nline'  # sfYaml unescapes only \" \n \r
    assert doc["d"] == "0123"
    assert doc["e"] == "kept\n"
    assert doc["f"] == [83, "b", "yes", {"g": 1.5}]
    assert doc["83"] == "octal key" and doc["1"] == "bool key"  # PHP array keys


def test_php_agrees_on_values_and_prefixes(tmp_path):
    """The real php binary, with sfYaml's decision order written out on PHP's own primitives (ctype_digit,
    octdec, is_numeric, floatval, strtotime, the (string) cast), prints the same text and md5 prefix."""
    texts = [t for t, _, _ in SCALARS]
    script = tmp_path / "eval.php"
    script.write_text(textwrap.dedent(r"""
        <?php
        date_default_timezone_set('UTC');
        $ts = '~^(?P<year>[0-9][0-9][0-9][0-9])-(?P<month>[0-9][0-9]?)-(?P<day>[0-9][0-9]?)'
            .'(?:(?:[Tt]|[ \t]+)(?P<hour>[0-9][0-9]?):(?P<minute>[0-9][0-9]):(?P<second>[0-9][0-9])'
            .'(?:\.(?P<fraction>[0-9]*))?(?:[ \t]*(?P<tz>Z|(?P<tz_sign>[-+])(?P<tz_hour>[0-9][0-9]?)'
            .'(?::(?P<tz_minute>[0-9][0-9]))?))?)?$~x';
        function evaluate($s, $ts) {
            $s = trim($s);
            if ('null' == strtolower($s) || '' == $s || '~' == $s) return null;
            if (ctype_digit($s)) {
                $c = intval($s);
                return '0' == $s[0] ? @octdec($s) : ((string) $s == (string) $c ? $c : $s);
            }
            if ('true' == strtolower($s)) return true;
            if ('false' == strtolower($s)) return false;
            if (is_numeric($s)) return '0x' == $s[0].$s[1] ? hexdec($s) : floatval($s);
            if (0 == strcasecmp($s, '.inf') || 0 == strcasecmp($s, '.NaN')) return -log(0);
            if (0 == strcasecmp($s, '-.inf')) return log(0);
            if (preg_match('/^(-|\+)?[0-9,]+(\.[0-9]+)?$/', $s)) return floatval(str_replace(',', '', $s));
            if (preg_match($ts, $s)) return strtotime($s);
            return (string) $s;
        }
        $out = [];
        foreach (json_decode(file_get_contents($argv[1])) as $t) {
            $v = evaluate($t, $ts);
            $out[] = [(string) $v, md5('/usr/share/nginx/atom'.$v)];
        }
        echo json_encode($out);
        """).lstrip())
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(texts))
    # Debian's php.ini, as AtoM's PHP on Debian has it (precision 14; ctype is a module it loads)
    php = subprocess.run(["php", str(script), str(cases)], capture_output=True, text=True, check=True)
    for text, (string, prefix) in zip(texts, json.loads(php.stdout), strict=True):
        ours = sfyaml.php_string(sfyaml.evaluate_scalar(text))
        assert (text, ours) == (text, string)
        assert atomconfig.job_prefix("/usr/share/nginx/atom", ours) == prefix


def test_php_float_strings_match_php():
    values = [1.5, 1.0, 1e20, 1e14, 1e13, 0.1, 1 / 3, -1.5e-7, 0.0001, 0.00001, 123456789012345678.0, -0.0,
              2.5e-300, 1.7976931348623157e308, 99999999999999.99, 0.000123456789012345]
    php = subprocess.run(["php", "-r", "foreach (json_decode($argv[1]) as $v) echo (string) (float) $v, \"\\n\";",
                          json.dumps(values)], capture_output=True, text=True, check=True)
    assert php.stdout.splitlines() == [sfyaml.php_float(v) for v in values]


def test_every_yaml_file_of_the_repository_parses():
    files = [f for pattern in ("**/*.yml", "**/*.yaml") for f in glob.glob(str(REPO / pattern), recursive=True)
             if not f.startswith((str(REPO / ".venv"), str(REPO / "build")))]
    standin = glob.glob(str(REPO / "tests/fixtures/atom/config/*.yml"))
    assert standin and set(standin) <= set(files) and len(files) > 40
    for path in files:
        sfyaml.loads(Path(path).read_text())  # raises on any file it could not read


@pytest.mark.parametrize("text, words", [
    ("a: 1\n b: 2\n", "line 2"), ("a: 'open\n", "line 2"), ("a: [1, 2\n", "line 2"),
    ("a: !!python/object:os.system x\n", "constructor"), ("a: *nowhere\n", "undefined alias"),
    ("a: " + "[" * 10000 + "]" * 10000 + "\n", "nested deeper than 64"),
    ("\n" * 3 + "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 200)), "nested deeper than 64"),
    ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n"
                                               for p, c in zip("abcdef", "bcdefg", strict=True)),
     "expands to more than"),
    ("--- 1\n--- 2\n", "single document"),
])
def test_bad_yaml_is_one_line_with_the_line(text, words):
    with pytest.raises(sfyaml.SfYamlError) as err:
        sfyaml.loads(text)
    assert words in str(err.value) and "\n" not in str(err.value)


# -- files: what AtoM's user could leave in config/ --------------------------------------------------------------
def site(tmp_path, gearman="all:\n  servers:\n    default: 127.0.0.1:4730\n", app="all:\n  workers_key: k\n"):
    (tmp_path / "config").mkdir()
    for name, text in (("gearman.yml", gearman), ("app.yml", app)):
        if text is not None:
            (tmp_path / "config" / name).write_text(text)
    return tmp_path


def config_error(root) -> str:
    """SiteConfig in a child process (a hang would be a failure, not a stuck test run): its one-line error."""
    code = ("import sys; from atom_workerctl import atomconfig, errors\n"
            "try:\n    atomconfig.SiteConfig(sys.argv[1])\n"
            "except errors.ConfigError as e:\n    print(e.exit_code, e)\n    sys.exit(0)\nsys.exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PYTHONPATH": str(REPO / "tools")}, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{EXIT_ERROR} "), proc.stdout
    return lines[0]


def test_good_site_control(tmp_path):
    """The positive control of the refusals below: the same layout with plain files is read."""
    cfg = atomconfig.SiteConfig(str(site(tmp_path)))
    assert cfg.servers == ["127.0.0.1:4730"] and cfg.workers_key == "k"


def test_fifo_is_refused_without_blocking(tmp_path):
    root = site(tmp_path, gearman=None)
    os.mkfifo(root / "config/gearman.yml")
    assert "gearman.yml is not a regular file" in config_error(root)


def test_symlink_is_refused(tmp_path):
    root = site(tmp_path, gearman=None)
    (root / "config/gearman.yml").symlink_to("/dev/zero")
    assert "gearman.yml is a symbolic link" in config_error(root)


def test_device_is_refused(tmp_path):
    root = site(tmp_path, gearman=None)
    os.mknod(root / "config/gearman.yml", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    assert "gearman.yml is not a regular file" in config_error(root)


def test_huge_file_is_refused(tmp_path):
    root = site(tmp_path)
    with open(root / "config/app.yml", "a") as fh:
        fh.write("# padding\n" * 120_000)
    assert "app.yml is larger than 1 MiB" in config_error(root)


def test_deep_nesting_is_refused(tmp_path):
    root = site(tmp_path, app="all:\n  workers_key: " + "[" * 10000 + "]" * 10000 + "\n")
    line = config_error(root)
    assert "app.yml" in line and "nested deeper than 64" in line


@pytest.mark.parametrize("server", ["a..b:4730", ".a:4730", "a-:1", "-oProxyCommand=x:1", "a b:1", "h:0",
                                    "h:65536", "h:x", "[::1:4730", "a:1:2:3x"])
def test_bad_server_names_are_refused(tmp_path, server):
    line = config_error(site(tmp_path, gearman=f'all:\n  servers: {{x: "{server}"}}\n'))
    assert "gearman.yml: servers.x:" in line and "is not host:port" in line


@pytest.mark.parametrize("server, name", [("gm2:4731", "gm2:4731"), ("10.0.0.5", "10.0.0.5:4730"),
                                          ("[::1]:4730", "[::1]:4730"), ("jobs.example.org.:1", "jobs.example.org.:1"),
                                          ("job_server:2", "job_server:2")])
def test_good_server_names_control(tmp_path, server, name):
    cfg = atomconfig.SiteConfig(str(site(tmp_path, gearman=f'all:\n  servers: {{x: "{server}"}}\n')))
    assert cfg.servers == [name]


def test_non_scalar_workers_key_is_refused(tmp_path):
    assert "workers_key is a mapping" in config_error(site(tmp_path, app="all:\n  workers_key: {a: b}\n"))


# -- the role's prefix is the CLI's prefix --------------------------------------------------------------------
ROLE_KEYS = ["", "main", "0123", "true", "yes", "1.50", "0x1A", "1,000.5", "2024-01-01", "~", "null", "it's",
             "a:1", "0123:4", "k # x", "-", "a\\tb", "é"]


@pytest.mark.parametrize("key", ROLE_KEYS)
def test_role_and_cli_compute_the_same_prefix(tmp_path, key):
    """The role's preflight makes workers_key a string; its module writes it into app.yml and its filter
    computes md5(realpath . key) for sites.json. The CLI reads that app.yml as AtoM does: same prefix."""
    root = site(tmp_path, app="all:\n  workers_key: old\n")
    app = root / "config/app.yml"
    text, _ = role_yaml.edit(app.read_text(), {"all.workers_key": key})
    app.write_text(text)
    realpath = os.path.realpath(root)
    cfg = atomconfig.SiteConfig(str(root))
    assert cfg.workers_key == key
    assert cfg.prefix == role_filters.atom_worker_prefix(realpath, key)
    assert cfg.prefix == hashlib.md5((realpath + key).encode()).hexdigest()
