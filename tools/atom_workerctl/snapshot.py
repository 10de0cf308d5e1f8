"""One look at the whole host: every instance's state, each site's configuration and gearmand's view.

`status`, `doctor` and the waits of `reset`/`restart`/`scale` all read the host through `take()`.

Registration. gearmand's `workers` lists one line per connection (its IP and the functions it
registered), but not the port, so a line cannot be tied to an instance. We tie them in two steps:
- an instance is *connected* to a server when one of its processes has an ESTABLISHED TCP connection
  to it: that server lists a line from this host naming the process (below), else the kernel's TCP
  table says so (procnet.py, from /proc; needs root; read only when some instance needs it: _connect);
- each line from this host's address that carries exactly a pool's expected function set is given to
  that pool (a line with only part of a set is a worker still registering: it counts for nothing yet);
  a pool's connected instances are *registered* at a server when that server lists at least as many
  lines for the pool as it has connected instances.
Pools with the same function set are counted together. Lines that fit no pool of any site here (an
old prefix: workers_key changed, release symlink moved) are given to the longest-running instances,
which started before the change. When a worker names its process in its client id (net_gearman,
AtoM's own library, sends `pid_<PID>_<uniqid>`), the line is tied to the instance exactly. Without
root, the connections of workers that do not are unknown, and a pool counts as registered when its
lines at least match its active instances.
"""

from __future__ import annotations

import os
import time

from . import model
from .atomconfig import SiteConfig
from .backend import UnitState
from .errors import ConfigError, WorkerctlError
from .gearman import ServerView, query_all


class PoolView:
    def __init__(self, pool: model.Pool):
        self.pool = pool
        self.classes: list[str] = []
        self.functions: frozenset[str] = frozenset()
        self.lines: dict[str, int] = {}       # server -> lines of this pool's function set from this host
        self.connected: dict[str, int] = {}   # server -> instances connected


class SiteView:
    def __init__(self, site: model.Site):
        self.site = site
        self.config: SiteConfig | None = None
        self.config_error: str | None = None
        self.servers: list[str] = list(site.gearman_servers)
        self.pools: list[PoolView] = [PoolView(p) for p in site.pools]
        # Per reachable server: connections from this host that carry one of the site's pools' whole
        # function sets, and connections from this host with no function at all (`FD IP ID :`: a worker
        # that reconnected and registered nothing, or is still registering).
        self.serving: dict[str, int] = {}
        self.bare: dict[str, list] = {}

    @property
    def prefix(self) -> str:
        return self.config.prefix if self.config else self.site.prefix

    def function_rows(self, view) -> list[tuple[str, str, int, int, int]]:
        """gearmand's view of the site's functions from one server's answer: (function, job class, waiting,
        running, available workers), the site's expected functions first (zeros when gearmand lists none),
        then any other under its prefix. Waiting is gearmand's total less the running jobs (its status
        counts a running job in its total)."""
        prefix = self.prefix + "-"
        expected = list(dict.fromkeys(f"{prefix}{c}" for pv in self.pools for c in pv.classes))
        rows = []
        for name in expected + sorted(f for f in view.functions if f.startswith(prefix) and f not in expected):
            fs = view.functions.get(name)
            total, running, available = (fs.queued, fs.running, fs.available) if fs else (0, 0, 0)
            rows.append((name, name[len(prefix):], max(total - running, 0), running, available))
        return rows


class InstanceView:
    def __init__(self, state: UnitState, pool: model.Pool | None, expected: bool):
        self.state = state
        self.pool = pool
        self.expected = expected
        self.connected: list[str] | None = []      # servers it holds a connection to (None: unknown)
        self.per_server: dict[str, bool | None] = {}
        self.pids: list[int] = []
        self.registered: bool | None = False       # at every reachable server (None: cannot tell)


class Snapshot:
    def __init__(self, host: model.Host):
        self.host = host
        self.taken_at = time.time()
        self.sites: list[SiteView] = [SiteView(s) for s in host.sites]
        self.instances: dict[str, InstanceView] = {}
        self.gearman: dict[str, ServerView] = {}
        self.gearman_queried = False

    def site_view(self, site: model.Site) -> SiteView:
        return next(v for v in self.sites if v.site is site)

    def pool_view(self, pool: model.Pool) -> PoolView:
        return next(pv for pv in self.site_view(pool.site).pools if pv.pool is pool)

    def reachable(self, sv: SiteView) -> list[str]:
        """The site's job servers that answered."""
        return [s for s in sv.servers if self.gearman.get(s) is not None and self.gearman[s].reachable]

    def strays(self) -> list[InstanceView]:
        return [i for i in self.instances.values() if not i.expected]

    def of_pool(self, pool: model.Pool) -> list[InstanceView]:
        return [self.instances[u] for u in pool.units if u in self.instances]


def read_site_configs(snap: Snapshot) -> None:
    for sv in snap.sites:
        try:
            sv.config = SiteConfig(sv.site.root)
        except WorkerctlError as exc:
            sv.config_error = str(exc)
            continue
        sv.servers = list(sv.config.servers)
        for pv in sv.pools:
            pv.classes = sv.config.abilities(pv.pool.types, pv.pool.abilities)
            pv.functions = frozenset(f"{sv.config.prefix}-{c}" for c in pv.classes)


def take(host: model.Host, backend, *, units: list[str] | None = None, gearman: bool = True,
         configs: bool = True, connections: bool = True, timeout: float | None = None) -> Snapshot:
    """Read the host. `units` limits the instances read (default: every expected and loaded one).

    gearmand is asked while the process manager is read (a thread, _Asking: the admin client is plain
    sockets, and the systemd backend's reads release the GIL as they wait); its answers are used once the
    process manager's are in."""
    snap = Snapshot(host)
    asking = _Asking() if gearman else None
    if configs:
        read_site_configs(snap)  # before asking gearmand: the job servers are in the sites' configuration
    if asking is not None:
        asking.ask(list(dict.fromkeys(s for sv in snap.sites for s in sv.servers)),
                   {} if timeout is None else {"timeout": timeout})
    # (When reading the process manager fails, its error goes up at once: the thread is a daemon, left to end.)
    expected = host.expected_units()
    names = expected if units is None else units
    states = backend.units(names, model.UNIT_GLOB if units is None else "")
    expected_set = set(expected)
    for unit, state in states.items():
        pool = host.pool_of(unit)
        inst = InstanceView(state, pool, unit in expected_set)
        # An inactive instance nobody expects is only the residue of a stop: leave it out.
        if not inst.expected and units is None and state.active_state == "inactive" and not state.job:
            continue
        snap.instances[unit] = inst
    confirm_give_ups(snap, host, backend)
    if asking is not None:
        snap.gearman = asking.result()
        snap.gearman_queried = True
        link(snap, backend, connections)
    else:
        for inst in snap.instances.values():
            inst.connected = None
            inst.registered = None
    return snap


class _Asking:
    """gearmand's `status` and `workers` of each server (query_all) in a thread; result() waits for it and
    raises what it raised. The thread is _thread's (a daemon: never waited for at exit): the threading
    module would add ~1 ms to every start-up."""

    def __init__(self):
        self.views: dict[str, ServerView] = {}
        self.error: BaseException | None = None
        self.lock = None

    def ask(self, servers: list[str], kw: dict) -> None:
        import _thread

        self.lock = _thread.allocate_lock()
        self.lock.acquire()
        _thread.start_new_thread(self._run, (servers, kw))

    def _run(self, servers: list[str], kw: dict) -> None:
        try:
            self.views = query_all(servers, **kw)
        except BaseException as exc:  # handed to the caller's thread by result()
            self.error = exc
        finally:
            self.lock.release()

    def result(self) -> dict[str, ServerView]:
        if self.lock is not None:
            with self.lock:
                pass
        if self.error is not None:
            raise self.error
        return self.views


def confirm_give_ups(snap: Snapshot, host: model.Host, backend) -> None:
    """A failed instance that UnitState.start_limit() takes for a give-up by its second sign (failed with a
    Result its Restart= would restart after) may have been stopped on purpose: a stop that ends uncleanly
    leaves the same state. systemd's last job line on it tells them apart; read only for such instances
    (rare), so status, doctor, watch and metrics never call a deliberate stop a give-up. When the journal
    cannot be read, the state's own judgement stands."""
    doubtful = [u for u, i in snap.instances.items()
                if i.state.limit_hit is None and i.state.result != "start-limit-hit" and i.state.start_limit()[0]]
    if not doubtful or host.manager != "systemd":
        return
    from . import journal

    try:
        entries = journal.read(doubtful, lines=20 * len(doubtful))
    except (WorkerctlError, OSError):
        return
    for unit in doubtful:
        if journal.stopped_on_purpose([e for e in entries if e.unit == unit]):
            snap.instances[unit].state.limit_hit = False


def _client_pid(client_id: str) -> int | None:
    """net_gearman's workers identify as `pid_<PID>_<uniqid>` (php-gearman's send no id: `-`)."""
    if client_id.startswith("pid_"):
        digits = client_id[4:].split("_", 1)[0]
        if digits.isdigit():
            return int(digits)
    return None


_NO_PIDS: frozenset[int] = frozenset()


def _connect(snap: Snapshot, connections: bool) -> None:
    """Each instance's `connected`: the job servers its processes hold a connection to (None: unknown).

    A worker that names its process in its client id (net_gearman's `pid_<PID>_...`) is connected to each
    server that lists a line from this host's address naming one of its processes: gearmand lists a
    connection for as long as it is open. Only an instance that some server of its site does not list so
    (a worker that sends no id, one not connected or still connecting, a server that did not answer) needs
    this host's TCP table (procnet, root only): reading it costs the kernel a walk of its whole table of
    established sockets, whose size follows the host's memory, not its sockets (about 2 ms per address
    family on a 24 GiB host), so it is read once, and only then."""
    named: dict[str, set[int]] = {}
    for server, view in snap.gearman.items():
        if view.reachable:
            named[server] = {pid for w in view.workers if w.ip == view.local_ip
                             for pid in (_client_pid(w.client_id),) if pid is not None}
    tables: list | None = None
    for sv in snap.sites:
        finder = None
        for pv in sv.pools:
            for inst in snap.of_pool(pv.pool):
                if not connections:
                    inst.connected = None
                elif not inst.pids:
                    inst.connected = []
                elif all(named.get(s, _NO_PIDS) & set(inst.pids) for s in sv.servers):
                    inst.connected = sorted(set(sv.servers))
                else:
                    if finder is None:
                        from .procnet import Connections

                        if tables is None:
                            tables = _own_tables()
                        finder = Connections(sv.servers, tables or None)
                    inst.connected = finder.of(inst.pids)


def _own_tables() -> list:
    """procnet.own_table() of both address families; [] when not root (whose sockets are whose is then
    unknown: Connections says so without reading any table)."""
    if os.geteuid() != 0:
        return []
    import _socket  # (socket.py is not needed for two constants: procnet.py says why)

    from .procnet import own_table

    return [own_table(_socket.AF_INET), own_table(_socket.AF_INET6)]


def link(snap: Snapshot, backend, connections: bool = True) -> None:
    """Tie instances to gearmand's worker lines (see the module's docstring)."""
    for inst in snap.instances.values():
        inst.pids = backend.pids(inst.state) if inst.pool is not None and inst.state.main_pid else []
    _connect(snap, connections)
    servers = list(dict.fromkeys(s for sv in snap.sites for s in sv.servers))
    for server in servers:
        view = snap.gearman.get(server)
        if view is None or not view.reachable:
            continue
        users = [pv for sv in snap.sites if server in sv.servers for pv in sv.pools]
        members = {id(pv): [i for i in snap.of_pool(pv.pool) if i.state.active] for pv in users}
        pool_of = {id(i): pv for pv in users for i in members[id(pv)]}
        owner_of_pid = {pid: i for pv in users for i in members[id(pv)] for pid in i.pids}
        sets = {pv.functions for pv in users if pv.functions}
        counts = dict.fromkeys(sets, 0)
        foreign = 0
        exact: set[int] = set()
        # Every connection from this host, those without a function too: a line that names its process
        # and registered nothing marks that instance as not registered.
        local = [w for w in view.workers if w.ip == view.local_ip]
        # gearmand lists every connection, ours too: the admin connection that asked is one of this host's
        # lines with no client id and no function. Leave one such line out.
        bare = [w for w in local if not w.functions]
        ours = next((w for w in bare if w.client_id == "-"), None)
        bare = [w for w in bare if w is not ours]
        for sv in snap.sites:
            if server in sv.servers:
                sets_here = {pv.functions for pv in sv.pools if pv.functions}
                sv.serving[server] = sum(1 for w in local if w.functions and frozenset(w.functions) in sets_here)
                sv.bare[server] = bare
        for line in local:
            funcs = set(line.functions)
            fits = [fs for fs in sets if funcs <= fs]
            # A worker registers its abilities one by one: only a line with the pool's whole function set
            # counts, or a rolling restart would move on while the new worker still lacks some of them.
            complete = [fs for fs in fits if funcs == fs]
            owner = owner_of_pid.get(_client_pid(line.client_id))
            if owner is not None:  # exact: the line names its process
                exact.add(id(owner))
                owner.per_server[server] = funcs == pool_of[id(owner)].functions
            elif complete:
                counts[complete[0]] += 1
            elif not fits and funcs:
                foreign += 1

        def talks(inst, server=server) -> bool:
            return inst.connected is None or server in inst.connected

        # Lines under a prefix no site expects come from processes started before the configuration
        # changed, so they belong to the longest-running instances.
        candidates = sorted((i for pv in users for i in members[id(pv)] if id(i) not in exact and talks(i)),
                            key=lambda i: i.state.since_usec)
        stale = {id(i) for i in candidates[:foreign]}
        for inst in candidates[:foreign]:
            inst.per_server[server] = False
        for fs in sets:
            pvs = [pv for pv in users if pv.functions == fs]
            rest = [i for pv in pvs for i in members[id(pv)] if id(i) not in exact and id(i) not in stale
                    and talks(i)]
            enough = counts[fs] >= len(rest)
            for pv in pvs:
                pv.lines[server] = counts[fs]
                pv.connected[server] = sum(1 for i in members[id(pv)] if i.connected and server in i.connected)
            for inst in rest:
                inst.per_server[server] = True if enough else None
    for sv in snap.sites:
        reachable = snap.reachable(sv)
        for pv in sv.pools:
            for inst in snap.of_pool(pv.pool):
                if not inst.state.active or not reachable:
                    inst.registered = False
                    continue
                if not pv.functions:
                    inst.registered = None  # the site's configuration could not be read
                    continue
                values = [inst.per_server.get(s, False) for s in reachable]
                inst.registered = False if False in values else (None if None in values else True)


def hostname() -> str:
    return os.uname().nodename


def require_config(sv: SiteView) -> SiteConfig:
    if sv.config is None:
        raise ConfigError(sv.config_error or f"site {sv.site.name}: configuration not read")
    return sv.config
