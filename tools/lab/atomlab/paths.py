"""Where the lab keeps its state and what it calls things. One place, so every module agrees."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
LAB_DIR = Path(__file__).resolve().parents[1]
STATE = Path("/var/lib/atom-lab")
HOSTS_DIR = STATE / "hosts"
SSH_KEY = STATE / "ssh" / "id_ed25519"
ADDRESSES = STATE / "addresses.json"
LAST_ADDRESS = STATE / "last-address"   # the last host octet handed out (network.allocate)
# pip's cache, shared by every host as its /root/.cache/pip: pystemd (an sdist) is compiled by the first host
# that installs atom-workerctl, and later hosts install the wheel pip kept.
PIP_CACHE = STATE / "pip-cache"

# The lab network: a bridge in its own namespace, no uplink. Hosts get 10.231.0.10 and up.
LAB_NETNS = "atomlab"
BRIDGE = "atomlab0"
SUBNET_PREFIX = "10.231.0."
CONTROL_ADDRESS = SUBNET_PREFIX + "1"
FIRST_HOST_OCTET = 10
LAST_HOST_OCTET = 250

DEFAULT_INVENTORY = REPO / "inventory" / "lab.yml"
DEFAULT_OUT = REPO / "inventory" / "lab" / "hosts.yml"


def host_netns(name: str) -> str:
    return f"atomlab-{name}"


def host_dir(name: str) -> Path:
    return HOSTS_DIR / name
