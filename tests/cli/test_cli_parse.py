"""The command line is parsed by a parser of just the named command (cli.parse: start-up time); whatever
argv is, the result must be what the whole parser gives: the same options, or the same one-line error."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import cli  # noqa: E402

ARGVS = [
    ["status"], ["status", "--json"], ["--json", "status", "atom-worker@2", "--no-gearman"],
    ["status", "--watch"], ["status", "--watch", "5"], ["--config", "/tmp/s.json", "doctor"],
    ["--config", "status", "doctor"],            # a main option's value that is also a command's name
    ["--conf", "status", "reset", "1"],          # the same with an abbreviated option
    ["--config=status", "reset", "--all"], ["--gearman-timeout", "2", "restart", "--rolling", "--no-wait"],
    ["scale", "4", "--pool", "serial"], ["logs", "-f", "-n", "5", "atom-worker@1"],
    ["jobs", "--stale"], ["jobs", "fail", "3", "4", "--site", "a", "--note", "x"],
    ["jobs", "export", "--since", "1 day ago"], ["jobs", "clear", "--before", "90 days ago", "--yes"],
    ["daemon-reload"], ["metrics", "--output", "/tmp/m.prom", "--functions", "no", "--jobs-every", "0"],
    ["notify", "atom-worker@1", "--dry-run"], ["completion", "bash"], ["_complete", "sites"],
    ["-i", "inv.yml", "-l", "w1", "status", "--json"], ["status", "-H", "w1", "-H", "w2"],
]
ERRORS = [
    ["status", "--bogus"], ["scale", "many"], ["nosuch"], ["--gearman-timeout", "0", "status"],
    ["status", "--watch", "nan"], ["jobs", "fail"], ["metrics", "--functions", ","], ["completion", "fish"],
    ["--config"], [], ["--", "status"],
]


def whole(argv):
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_the_one_command_parser_gives_what_the_whole_parser_gives(argv):
    args, parser = cli.parse(argv)
    assert vars(args) == vars(whole(argv))


def test_the_one_command_parser_is_used(monkeypatch):
    # The control for the test above: parse() really builds one command's parser for a usual command line.
    built = []
    real = cli.build_parser

    def spy(*a, **kw):
        parser = real(*a, **kw)
        built.append(sorted(parser._subparsers._group_actions[0].choices))
        return parser

    monkeypatch.setattr(cli, "build_parser", spy)
    cli.parse(["status", "--json"])
    assert built == [["status"]]


@pytest.mark.parametrize("argv", ERRORS, ids=lambda a: " ".join(a) or "(none)")
def test_errors_are_the_whole_parser_s(argv, capsys):
    try:
        expected = ("parsed", vars(whole(argv)))
    except SystemExit as exc:
        expected = ("exit", exc.code)
    want_err = capsys.readouterr().err
    try:
        got = ("parsed", vars(cli.parse(argv)[0]))
    except SystemExit as exc:
        got = ("exit", exc.code)
    assert got == expected and capsys.readouterr().err == want_err


@pytest.mark.parametrize("argv", [["-h", "status"], ["--help", "doctor"], ["status", "-h"], ["--help"]], ids=" ".join)
def test_help_is_the_whole_parser_s(argv, capsys):
    with pytest.raises(SystemExit):
        whole(argv)
    want = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.parse(argv)
    assert capsys.readouterr().out == want and want
