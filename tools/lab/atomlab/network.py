"""The lab network: one bridge in namespace `atomlab`, one namespace and veth per host, no way out.

The bridge's namespace has no uplink and no default route, and the root namespace gets no link to it, so
no lab address can leave this machine. Hosts route via the bridge address only so that they look like
ordinary hosts (Ansible's default-IPv4 facts need a default route); packets beyond the subnet die there.
"""
import json
from pathlib import Path

from . import paths
from .run import LabError, run


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


SUBNET = paths.SUBNET_PREFIX + "0/24"


def _guard_root_namespace() -> None:
    """The machine's default route would carry lab addresses off the machine: make them unreachable here."""
    routes = run(["ip", "route", "show", SUBNET], capture=True).stdout
    if "unreachable" not in routes:
        run(["ip", "route", "replace", "unreachable", SUBNET])


def ensure_bridge() -> None:
    _guard_root_namespace()
    if netns_exists(paths.LAB_NETNS):
        return
    ns = paths.LAB_NETNS
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "add", paths.BRIDGE, "type", "bridge"])
    run(["ip", "-n", ns, "addr", "add", paths.CONTROL_ADDRESS + "/24", "dev", paths.BRIDGE])
    run(["ip", "-n", ns, "link", "set", paths.BRIDGE, "up"])


def remove_bridge() -> None:
    if netns_exists(paths.LAB_NETNS):
        run(["ip", "netns", "del", paths.LAB_NETNS], check=False)
    run(["ip", "route", "del", "unreachable", SUBNET], check=False, quiet=True)


def _load_addresses() -> dict[str, int]:
    if paths.ADDRESSES.exists():
        return json.loads(paths.ADDRESSES.read_text())
    return {}


def address_of(name: str) -> str:
    return paths.SUBNET_PREFIX + str(_load_addresses()[name])


def allocate(name: str) -> str:
    """A stable address per host name: the same name gets the same address while the lab lives.

    A new host gets the next free address after the last one handed out (wrapping around), not the lowest
    free one: an address a removed host had is not reused for a long while. Otherwise a new host answers at
    an address that ssh clients still use for the old one (Ansible's ControlPersist masters, shared by every
    run on this machine, and host-key checks are off for the lab), so one test module's commands could fail
    mid-run or reach another module's host.
    """
    table = _load_addresses()
    if name not in table:
        free = sorted(set(range(paths.FIRST_HOST_OCTET, paths.LAST_HOST_OCTET)) - set(table.values()))
        if not free:
            raise LabError("the lab subnet is full")
        last = int(paths.LAST_ADDRESS.read_text()) if paths.LAST_ADDRESS.exists() else 0
        table[name] = next((octet for octet in free if octet > last), free[0])
        paths.ADDRESSES.write_text(json.dumps(table, indent=1, sort_keys=True))
        paths.LAST_ADDRESS.write_text(f"{table[name]}\n")
    return paths.SUBNET_PREFIX + str(table[name])


def release(name: str) -> None:
    table = _load_addresses()
    if table.pop(name, None) is not None:
        paths.ADDRESSES.write_text(json.dumps(table, indent=1, sort_keys=True))


def plug(name: str) -> str:
    """Give host `name` its namespace, a veth on the bridge and its address; return the address."""
    address = allocate(name)
    ns = paths.host_netns(name)
    octet = address.rsplit(".", 1)[1]
    outer = f"atomlab-v{octet}"
    if netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)
    run(["ip", "-n", paths.LAB_NETNS, "link", "del", outer], check=False, quiet=True)
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    # The MAC follows from the address: a host re-created at the same address has the same MAC, so no
    # neighbour cache (the bridge's or another host's) ever holds a stale entry for it.
    mac = f"02:00:0a:e7:00:{int(octet):02x}"
    run(["ip", "-n", paths.LAB_NETNS, "link", "add", outer, "type", "veth", "peer", "name", "eth0",
         "address", mac, "netns", ns])
    run(["ip", "-n", paths.LAB_NETNS, "link", "set", outer, "master", paths.BRIDGE, "up"])
    run(["ip", "-n", ns, "addr", "add", address + "/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", paths.CONTROL_ADDRESS])
    return address


def cut(name: str) -> None:
    """Take the bridge's end of the host's veth down: from now on nothing the host sends reaches anyone."""
    octet = address_of(name).rsplit(".", 1)[1]
    run(["ip", "-n", paths.LAB_NETNS, "link", "set", f"atomlab-v{octet}", "down"], check=False, quiet=True)


def unplug(name: str) -> None:
    ns = paths.host_netns(name)
    if netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)


def hosts_file(names: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{paths.CONTROL_ADDRESS}\tcontrol"]
    lines += [f"{address_of(n)}\t{n}" for n in sorted(names)]
    return "\n".join(lines) + "\n"


def write_control_hosts(names: list[str]) -> None:
    """/etc/hosts for commands run through `lab exec` (ip netns exec binds /etc/netns/NS/hosts there).

    Written in place, not replaced, so that the bind mount of a running `lab exec` sees the change.
    """
    target = Path("/etc/netns", paths.LAB_NETNS, "hosts")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w") as handle:
        handle.write(hosts_file(names))
