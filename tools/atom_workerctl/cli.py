"""Command line: argparse, dispatch, and the one rule for errors (one line on stderr, never a traceback).

Start-up time matters (`status` is run in loops and benchmarked): this module imports only argparse and
the standard library; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

PROG = "atom-workerctl"
# One deadline per job server for connecting and both admin answers (gearman.py): a slow peer costs this.
GEARMAN_TIMEOUT = 3.0
GEARMAN_TIMEOUT_HELP = f"one deadline per gearmand: connect, status, workers; seconds (default {GEARMAN_TIMEOUT:g})"

DESCRIPTION = """\
See and fix the AtoM job workers of this host: systemd instances (pystemd over D-Bus), the job
server's view (gearmand's admin protocol) and their journal. The host's sites, pools and instances
come from /etc/atom-worker/sites.json, written by the atom_worker role.
"""

EXAMPLES = """\
examples:
  atom-workerctl status                     every instance, and gearmand's view of each site's jobs
  atom-workerctl status --json | jq .summary
  atom-workerctl doctor                     why "No Gearman worker available..."? evidence and fixes
  atom-workerctl reset                      reset-failed + start every instance that is down, wait
  atom-workerctl logs -f                    follow every instance's journal, merged, tagged
  atom-workerctl restart --rolling          one at a time, each registered again before the next
  atom-workerctl scale 4                    run atom-worker@1..4 now (until the next site.yml run)
  source <(atom-workerctl completion bash)  shell completion

fleets (each host runs its own atom-workerctl over ssh; README: Fleets):
  atom-workerctl -i inventory/prod.yml status          every host of atom_workers, gearmand's view merged
  atom-workerctl -i inventory/prod.yml -l worker2 doctor
  atom-workerctl -H root@worker1 -H worker2 logs -f    merged, tagged host/instance
  atom-workerctl -i inventory/prod.yml restart --rolling   one host at a time

exit codes (as systemctl's): 0 ok; 3 some instance not active (status), faults found (doctor), or a
wait that did not end registered; 4 no such site, pool or instance; 1 any other error; 2 usage;
5 (fleet) some host not reached (unreachable, timed out): the others answered.
"""

COMMAND_HELP = {
    "status": ("show instances, their state and gearmand's view",
               ("examples:\n  atom-workerctl status\n  atom-workerctl status atom-worker@2 --no-gearman\n"
               "  atom-workerctl status --pool serial --json\n"
               "  atom-workerctl status --watch   live: queues, their trend, instances needing someone\n\n"
               "exit codes: 0 all selected instances active, 3 some not active, 4 no such instance, 1 error.\n"
               "The --json schema is documented in tools/atom_workerctl/README.md (\"schema\": 1).")),
    "reset": ("reset-failed and start the instances that are down, then wait until registered",
              ("examples:\n  atom-workerctl reset                 every instance that is down\n"
              "  atom-workerctl reset atom-worker@2\n  atom-workerctl reset --pool serial --no-wait\n\n"
              "Exit 0 when every instance it started is active and registered with gearmand, 3 otherwise.")),
    "restart": ("restart instances (reset-failed first); --rolling: one at a time",
                ("examples:\n  atom-workerctl restart --rolling     no job type ever loses its last worker\n"
                "  atom-workerctl restart atom-worker@1\n  atom-workerctl restart --site archive --rolling\n\n"
                "Every restart resets the instance's failed state and start-limit counter first, so deliberate\n"
                "restarts never use up the start limit (StartLimitBurst) meant for crash loops.")),
    "scale": ("run instances 1..N of a pool now (enable+start), stop and disable the rest",
              ("examples:\n  atom-workerctl scale 4                the default pool\n"
              "  atom-workerctl scale 2 --pool serial\n  atom-workerctl scale 0 --pool reports --site archive\n\n"
              "A runtime change: it is written to sites.json, and the next site.yml run returns the pool to the\n"
              "inventory's size (atom_worker_instances / the pool's instances). Set it there to keep it.")),
    "logs": ("the journal of the instances, merged in time order and tagged by instance",
             ("examples:\n  atom-workerctl logs                   the last 50 lines of every instance\n"
             "  atom-workerctl logs -f                follow, across restarts\n"
             "  atom-workerctl logs -n 200 atom-worker@2\n  atom-workerctl logs --since '1 hour ago' --json")),
    "doctor": ("find the usual faults, with evidence and the command that fixes each",
               ("Checks: the site's config files; gearmand reachable (address from config/gearman.yml); every job\n"
               "type has an available worker; workers registered under the site's prefix\n"
               "md5(realpath(root) . workers_key); start limit used up; crash loops; instances down, not\n"
               "enabled or not registered; unit files changed but not reloaded.\n\n"
               "examples:\n  atom-workerctl doctor\n  atom-workerctl doctor --json | jq '.findings[].code'\n\n"
               "exit codes: 0 healthy (warnings allowed), 3 faults found, 1 error.")),
    "jobs": ("AtoM's jobs (its job table) beside gearmand's queue: find a job stuck at Running, fail it alone",
             ("examples:\n  atom-workerctl jobs                    the newest 50, and who runs those in progress\n"
              "  atom-workerctl jobs --status error --since '1 week ago'\n"
              "  atom-workerctl jobs --stale            rows in progress that nothing runs or will, with evidence\n"
              "  atom-workerctl jobs fail 1234          mark a stale row error (with a note), as AtoM does\n"
              "  atom-workerctl jobs export > jobs.csv  the history as AtoM's own jobs CSV\n"
              "  atom-workerctl jobs clear --before '90 days ago'   delete finished rows only\n\n"
              "The database comes from each site's config/config.php (never from the command line).\n"
              "exit codes: 0 ok; 3 stale rows found (--stale); 4 no such site or job; 1 error.")),
    "metrics": ("the instances and gearmand's queues in Prometheus' text format (node_exporter's textfile)",
                ("examples:\n  atom-workerctl metrics\n"
                 "  atom-workerctl metrics --output /var/lib/prometheus/node-exporter/atom-worker.prom\n"
                 "  atom-workerctl metrics --functions no   leave gearmand's per-function view to another host\n\n"
                 "--output replaces the file atomically. Exit 0 whenever the host could be read (an unreachable\n"
                 "gearmand is a series, atom_worker_gearmand_up 0); 1 otherwise, the file left as it was.\n"
                 "The series and the alert rules: README.md, Monitoring.")),
    "notify": ("send the notice that an instance gave up (OnFailure=, supervisord's listener, circus's hooks)",
               ("examples:\n  atom-workerctl notify atom-worker@2             what systemd's OnFailure= runs\n"
                "  atom-workerctl notify atom-worker@2 --dry-run   show the notice, send nothing\n\n"
                "Sends only when the instance gave up (its start limit is used up, not a deliberate stop), once per\n"
                "give-up, on the channels of notify.json beside sites.json (atom_worker_notify: log, mail, webhook).\n"
                "exit codes: 0 sent, or nothing to send (why on stderr); 1 a channel failed (the others were tried);\n"
                "4 no such instance.")),
    "daemon-reload": ("make systemd reread changed unit files (Manager.Reload)",
                      "example:\n  atom-workerctl daemon-reload && atom-workerctl restart --rolling"),
    "completion": ("print a shell completion script",
                   ("examples:\n  source <(atom-workerctl completion bash)\n"
                   "  atom-workerctl completion bash > /etc/bash_completion.d/atom-workerctl")),
}


def _columns() -> int:
    """shutil.get_terminal_size().columns, as argparse's help formatter asks it, without importing shutil
    (which imports bz2 and lzma: ~2 ms of every start-up, as argparse builds a formatter per option)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return columns


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's RawDescriptionHelpFormatter, its width found as argparse finds it (less 2), by _columns()."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block first), exit 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def seconds(text: str) -> float:
    """A timeout option: a finite number of seconds above 0. argparse's float also takes 0, -1, nan and inf,
    which would reach socket and ssh timeouts as nonsense."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text})")
    return value


def _functions_choice(text: str) -> str:
    """yes, no, or a comma-separated list of site names (checked against sites.json when the command runs)."""
    if text in ("yes", "no") or all(name.strip() for name in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(f"yes, no or site names separated by commas (got {text!r})")


def _non_negative(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds (got {text})")
    return value


_COMMON: dict = {}


def _common(json_opt: bool = True) -> argparse.ArgumentParser:
    """Options every command accepts after its name (defaults suppressed: the main parser's win).

    Built once per variant: argparse copies a parent's actions by reference, which costs less at start-up
    than adding them to every command again."""
    if json_opt not in _COMMON:
        _COMMON[json_opt] = _make_common(json_opt)
    return _COMMON[json_opt]


def _make_common(json_opt: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                   help="the host model (default: /etc/atom-worker/sites.json or $ATOM_WORKERCTL_CONFIG)")
    p.add_argument("--gearman-timeout", metavar="S", type=seconds, default=argparse.SUPPRESS,
                   help=GEARMAN_TIMEOUT_HELP)
    if json_opt:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output on stdout")
        _fleet_options(p, suppress=True)
    return p


def _fleet_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Fleet options: on the main parser (real defaults) and after each fleet command (defaults suppressed)."""
    d = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    g = p.add_argument_group("fleet (run the command on many hosts over ssh; README: Fleets)")
    g.add_argument("-i", "--inventory", metavar="FILE", default=d(None),
                   help="an Ansible inventory: the hosts of its group atom_workers (see --group)")
    g.add_argument("-l", "--limit", metavar="PATTERN", default=d(None),
                   help="only these inventory hosts (Ansible's --limit pattern)")
    g.add_argument("--group", metavar="GROUP", default=d(None),
                   help="the inventory group to work on (default atom_workers)")
    # After the command, -H collects into its own list: argparse would let it replace the hosts given before.
    g.add_argument("-H", "--host", dest="hosts_after" if suppress else "hosts", metavar="[USER@]HOST[:PORT]",
                   action="append", default=d([]),
                   help="a host to work on (repeat for several), instead of --inventory")
    g.add_argument("--parallel", metavar="N", type=int, default=d(None),
                   help="hosts worked on at the same time (default 10; restart --rolling: 1, a host after another)")
    g.add_argument("--host-timeout", metavar="S", type=seconds, default=d(None),
                   help="give up on a host after S seconds (default 30; reset/restart/scale 300)")


def _selection(p: argparse.ArgumentParser, all_opt: bool = False) -> None:
    p.add_argument("instances", nargs="*", metavar="INSTANCE",
                   help="atom-worker@1, atom-worker-default-serial@2 (.service optional), a glob, "
                        "or N for atom-worker@N")
    p.add_argument("--site", metavar="SITE", help="only this site's instances")
    p.add_argument("--pool", metavar="POOL", help="only this pool's instances")
    if all_opt:
        p.add_argument("--all", action="store_true", help="every instance (the default without INSTANCE)")


def _wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="do not wait until registered with gearmand")
    p.add_argument("--wait-timeout", metavar="S", type=seconds, default=60.0,
                   help="give up waiting after S seconds (default 60)")


class _Skipped:
    """Stands for the parser of a command this run does not build: every call on it does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self


def build_parser(for_argv: list[str] | None = None, parser_class: type = None) -> argparse.ArgumentParser:
    """The command line's parser; FOR_ARGV: a parser of just the command that argv names (see parse())."""
    from . import __version__

    parser = (parser_class or _Parser)(prog=PROG, description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="the host model (default: /etc/atom-worker/sites.json or $ATOM_WORKERCTL_CONFIG)")
    parser.add_argument("--gearman-timeout", metavar="S", type=seconds, default=GEARMAN_TIMEOUT,
                        help=GEARMAN_TIMEOUT_HELP)
    parser.add_argument("--json", action="store_true", default=False, help="machine-readable output on stdout")
    _fleet_options(parser)
    only = None
    if for_argv is not None:
        only = _command_named(parser, for_argv)
        if only is None:
            raise _Miss("no command named")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, json_opt: bool = True) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Skipped()
        short, epilog = COMMAND_HELP[name]
        return sub.add_parser(name, help=short, description=short[0].upper() + short[1:] + ".", epilog=epilog,
                              parents=[_common(json_opt)], formatter_class=_Formatter)

    p = add("status")
    _selection(p)
    p.add_argument("--no-gearman", action="store_true", help="do not ask gearmand (systemd's view only)")
    p.add_argument("--watch", metavar="SECONDS", nargs="?", type=seconds, const=2.0, default=None,
                   help="refresh in place every SECONDS (default 2): queues, their trend, instances needing "
                        "someone; q quits")

    p = add("reset")
    _selection(p, all_opt=True)
    _wait(p)

    p = add("restart")
    _selection(p)
    p.add_argument("--rolling", action="store_true",
                   help="one instance at a time, each registered with gearmand again before the next")
    _wait(p)

    p = add("scale")
    p.add_argument("count", metavar="N", type=int, help="instances to run: 1..N")
    p.add_argument("--pool", metavar="POOL", help="the pool (default: default)")
    p.add_argument("--site", metavar="SITE", help="the pool's site (default: default)")
    _wait(p)

    p = add("logs")
    _selection(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep following (across restarts)")
    p.add_argument("-n", "--lines", metavar="N", type=int, help="the last N lines (default 50; 10 with -f)")
    p.add_argument("--since", metavar="TIME", help="journalctl's --since ('1 hour ago', '2024-05-01 10:00')")
    p.add_argument("--until", metavar="TIME", help="journalctl's --until")

    add("doctor")
    _jobs_parser(add("jobs"))
    add("daemon-reload", json_opt=False)

    p = add("metrics", json_opt=False)
    p.add_argument("--output", metavar="FILE", help="write FILE atomically instead of stdout")
    p.add_argument("--functions", metavar="yes|no|SITE,...", type=_functions_choice, default="yes",
                   help="the per-function series of gearmand's queues: yes (default), no, or only these sites' "
                        "(in a fleet one host exports each site's)")
    p.add_argument("--jobs", choices=["yes", "no"], default="yes",
                   help="AtoM's job rows in progress and stale ones, from each site's database (default yes)")
    p.add_argument("--jobs-every", metavar="S", type=_non_negative, default=300.0,
                   help="with --output: read the job table at most every S seconds, the runs between reuse its "
                        "counts (default 300; 0: every run)")

    p = add("notify", json_opt=False)
    p.add_argument("instances", nargs=1, metavar="INSTANCE", help="the instance that gave up (atom-worker@2)")
    p.add_argument("--notify-config", metavar="PATH",
                   help="the notice settings (default: notify.json beside sites.json)")
    p.add_argument("--dry-run", action="store_true", help="print the notice instead of sending it")
    p.set_defaults(site=None, pool=None)

    p = add("completion", json_opt=False)
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell")

    if only is None or only == "_complete":
        hidden = sub.add_parser("_complete", parents=[_common(False)])  # used by the completion script
        hidden.add_argument("what", choices=["instances", "pools", "sites"])
    # Keep `_complete` out of the help's command list.
    sub._choices_actions = [a for a in sub._choices_actions if a.dest != "_complete"]
    return parser


def _jobs_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", metavar="SITE", help="only this site's database (default: every site's)")
    p.add_argument("--status", metavar="S", help="running, completed, error or all; several with commas")
    p.add_argument("--since", metavar="TIME", help="submitted since ('1 day ago', '2026-05-01 10:00')")
    p.add_argument("-n", "--lines", metavar="N", type=int, default=50,
                   help="the newest N rows (default 50; 0: all)")
    p.add_argument("--stale", action="store_true",
                   help="only rows in progress that nothing runs or will, with the evidence and the fix")
    actions = p.add_subparsers(dest="jobs_action", metavar="ACTION")
    f = actions.add_parser("fail", help="mark stale rows error, with a note", parents=[_common()],
                           description="Mark rows in progress that nothing runs as error (completed_at, an "
                                       "error note), as AtoM's own error path does. Refuses a row a worker or "
                                       "gearmand may still run, unless --force.")
    f.add_argument("ids", nargs="+", type=int, metavar="ID", help="the job rows' ids (jobs --stale names them)")
    f.add_argument("--site", metavar="SITE", default=argparse.SUPPRESS, help="the site's database")
    f.add_argument("--note", metavar="TEXT", help="the error note (default: who marked it and why)")
    f.add_argument("--force", action="store_true", help="even when a worker or gearmand may still run it")
    e = actions.add_parser("export", help="the history as AtoM's jobs CSV on stdout", parents=[_common()],
                           description="AtoM's jobs CSV (startDate, endDate, jobName, jobStatus, jobInfo, jobUser),"
                                       " oldest first, on stdout.")
    e.add_argument("--site", metavar="SITE", default=argparse.SUPPRESS, help="only this site's database")
    e.add_argument("--status", metavar="S", default=argparse.SUPPRESS, help="running, completed, error or all")
    e.add_argument("--since", metavar="TIME", default=argparse.SUPPRESS, help="submitted since TIME")
    e.add_argument("--before", metavar="TIME", help="finished (or, in progress, submitted) before TIME")
    c = actions.add_parser("clear", help="delete finished rows older than a time, and their notes",
                           parents=[_common()],
                           description="Delete finished rows (completed, error) finished before --before, and "
                                       "their notes; never a row in progress. Says how many first.")
    c.add_argument("--before", metavar="TIME", required=True, help="finished before TIME ('90 days ago')")
    c.add_argument("--site", metavar="SITE", default=argparse.SUPPRESS, help="only this site's database")
    c.add_argument("--status", metavar="S", default=argparse.SUPPRESS,
                   help="completed, error or both (default completed,error)")
    c.add_argument("--yes", action="store_true", help="do not ask (needed when not on a terminal)")


class _Miss(Exception):
    """The one-command parser cannot parse this command line: the whole parser must."""


class _QuietParser(_Parser):
    def error(self, message: str):
        raise _Miss(message)


def _command_named(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The command argv names: its first word that is a command and not the value of a main option."""
    takes_value = {o for a in parser._actions if a.option_strings and a.nargs != 0 for o in a.option_strings}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--", "-h", "--help"):
            return None  # `-h COMMAND` is the main help, which lists every command
        elif word.startswith("-"):
            # An option that takes a value as the next word (argparse also takes unique prefixes of long ones).
            skip = "=" not in word and (word in takes_value or word.startswith("--") and any(
                o.startswith(word) for o in takes_value if o.startswith("--")))
        else:
            return word if word in COMMAND_HELP or word == "_complete" else None
    return None


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser | None]:
    """Parse argv with a parser of just the command it names (building all ~15 commands' parsers is most of
    the start-up of a short command); when that parser cannot parse it, the whole parser does (and says why).
    Returns the whole parser when it was built, else None."""
    try:
        args = build_parser(for_argv=argv, parser_class=_QuietParser).parse_args(argv)
        if args.command is not None:
            return args, None
    except _Miss:
        pass
    parser = build_parser()
    return parser.parse_args(argv), parser


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of the parser and its commands (to resolve abbreviations as argparse does)."""
    opts = set()
    for action in parser._actions:
        opts.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                opts.update(o for a in sub._actions for o in a.option_strings if o.startswith("--"))
    return sorted(opts)


def _debug() -> bool:
    return bool(os.environ.get("ATOM_WORKERCTL_DEBUG"))


def fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    from .errors import EXIT_ERROR, WorkerctlError

    try:
        argv = sys.argv[1:] if argv is None else argv
        args, parser = parse(argv)
        args.hosts = [*getattr(args, "hosts", []), *vars(args).pop("hosts_after", [])]
        if args.command is None:
            (parser or build_parser()).print_help()
            return 2
        if getattr(args, "inventory", None) or getattr(args, "hosts", None) or getattr(args, "limit", None):
            from . import cmd_fleet  # only now: the single-host path never imports the fleet code

            return cmd_fleet.run(args, argv, _long_options(parser or build_parser()))
        return dispatch(args)
    except WorkerctlError as exc:
        if _debug():
            raise
        return fail(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # Silence the flush at exit: the reader went away (`| head`).
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except PermissionError as exc:
        if _debug():
            raise
        return fail(f"error: permission denied: {exc.filename or exc} (run as root)", EXIT_ERROR)
    except OSError as exc:
        if _debug():
            raise
        return fail(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", EXIT_ERROR)
    except Exception as exc:
        if _debug():
            raise
        return fail(f"internal error: {type(exc).__name__}: {exc} (ATOM_WORKERCTL_DEBUG=1 shows the traceback)",
                    EXIT_ERROR)


def dispatch(args) -> int:
    if args.command == "completion":
        from .completion import script

        sys.stdout.write(script(build_parser(), args.shell))
        return 0
    from . import model

    if args.command == "_complete":
        return _complete(args)
    if getattr(args, "watch", None) is not None and (args.json or args.instances or args.site or args.pool
                                                      or args.no_gearman):
        from .errors import EXIT_USAGE, WorkerctlError

        raise WorkerctlError("status --watch shows the whole host with gearmand's view: no instances, --site, "
                         "--pool, --no-gearman or --json", EXIT_USAGE)
    host = model.load(args.config)
    # Unknown sites, pools and instances fail (exit 4) before anything talks to systemd.
    if args.command == "scale":
        site = args.site or ("default" if any(s.name == "default" for s in host.sites) else None)
        host.pool(args.pool or "default", site)
    elif hasattr(args, "instances"):
        model.select(host, [n for n in args.instances if not any(c in n for c in "*?[")], args.site, args.pool)
    if args.command == "logs":
        from . import cmd_logs
        from .errors import ManagerError

        try:
            backend = _backend(host)
        except ManagerError:
            backend = None  # the journal does not need D-Bus; stray instances are just not listed
        return cmd_logs.run(args, host, backend)
    if args.command == "jobs":
        from . import cmd_jobs

        cmd_jobs.check_args(args, host)  # bad input is refused before anything is asked
        if getattr(args, "jobs_action", None) in ("export", "clear"):
            return cmd_jobs.run(args, host, None)  # the database only: no process manager needed
    backend = _backend(host)
    try:
        if args.command == "status" and args.watch is not None:
            from . import cmd_watch

            return cmd_watch.run(args, host, backend)
        if args.command == "status":
            from . import cmd_status

            return cmd_status.run(args, host, backend)
        if args.command == "doctor":
            from . import cmd_doctor

            return cmd_doctor.run(args, host, backend)
        if args.command == "jobs":
            from . import cmd_jobs

            return cmd_jobs.run(args, host, backend)
        if args.command == "metrics":
            from . import cmd_metrics

            return cmd_metrics.run(args, host, backend)
        if args.command == "notify":
            from . import cmd_notify

            return cmd_notify.run(args, host, backend)
        from . import cmd_actions

        return {"reset": cmd_actions.reset, "restart": cmd_actions.restart, "scale": cmd_actions.scale,
                "daemon-reload": cmd_actions.daemon_reload}[args.command](args, host, backend)
    finally:
        backend.close()


def _backend(host):
    from .backend import open_backend

    return open_backend(host.manager, host)


def _complete(args) -> int:
    from . import model

    try:
        host = model.load(args.config)
    except Exception:
        return 0
    if args.what == "instances":
        words = [model.short(u) for u in host.expected_units()]
    elif args.what == "pools":
        words = sorted({p.name for p in host.pools()})
    else:
        words = [s.name for s in host.sites]
    sys.stdout.write("\n".join(words) + ("\n" if words else ""))
    return 0
