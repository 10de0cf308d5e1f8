#!/usr/bin/env bash
# Issue 12, section 1: the README's Quick start on a real, stock Debian 12, as a new user would run it.
#
# 1. Builds a Debian 12 (bookworm) VM image with debootstrap holding what a Debian cloud image holds
#    (debootstrap's default set of "required" and "important" packages, plus linux-image-amd64,
#    systemd-sysv, openssh-server, sudo, ca-certificates; systemd-networkd does DHCP on the virtio NIC) and
#    nothing of this project: no git, no make, no python3-venv. A raw ext4 file of 20 GB, sparse.
# 2. Boots it with qemu under software emulation (TCG; this machine's /dev/kvm cannot boot stock kernels).
# 3. Inside, as root, does what the README's Quick start says: `apt-get install make git`, `git clone` this
#    repository (from a `git bundle` of HEAD copied in: the commit, not uncommitted changes), `make demo`.
# 4. Then one Molecule scenario the way the Makefile runs it (STOCK_MOLECULE=0 skips it).
# 5. Writes results.json and results.md next to this script, powers the VM off and removes the run's files,
#    except after a stopped run: its disk is kept, and STOCK_RESUME=1 boots that disk again, removes the
#    lab's hosts (`lab down`: a stop mid-converge leaves their dpkg interrupted; the golden image stays) and
#    runs `make demo` once more in the same clone, as a user would after an interruption. The results then
#    show every leg (under TCG the whole of `make demo` takes longer than one working session here).
#
# Needs, on the machine running it (Debian 12, root): qemu-system-x86 and debootstrap
# (`apt-get install qemu-system-x86 debootstrap`), plus openssh-client, e2fsprogs and python3 (for the JSON).
#
# Kept under $STOCK_WORK (default /var/tmp/stock-debian) for reruns: the pristine image (bookworm-stock.img)
# with its kernel and initrd, and the full logs of the last run (logs/). A rerun boots a fresh copy of the
# pristine image; STOCK_REBUILD=1 builds the image again; `rm -rf /var/tmp/stock-debian` removes everything.
# A stopped run keeps its VM disk in $STOCK_WORK/run for STOCK_RESUME=1.
#
# Everything heavy runs under `nice -n 19 ionice -c3`: the machine may be running other work (a test suite).
#
# Network: the VM uses qemu's user networking (NAT through this machine); its ssh port is forwarded to
# 127.0.0.1:$STOCK_SSH_PORT only. By default this machine's extra CA certificates
# (/usr/local/share/ca-certificates) and /etc/pip.conf are copied into the guest: this machine reaches
# HTTPS registries through a proxy with its own CA (STOCK_COPY_HOST_CA=0 skips the copy where not needed).
#
# Usage: bench/stock-debian/run.sh            (as root, from any directory)
#        STOCK_RESUME=1 bench/stock-debian/run.sh   (a stopped run's disk, make demo again)
#        bench/stock-debian/run.sh pause | continue   (freezes the running VM and this script, e.g. while
#            the machine runs a test suite that must have it alone; paused time is left out of the figures)
#        bench/stock-debian/run.sh results   (results.md and results.json again from the kept logs)
#        bench/stock-debian/run.sh stop    (powers the VM off cleanly, keeps its disk; a stop in the middle
#            of an apt-get inside leaves dpkg for the resumed run to finish)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)

WORK=${STOCK_WORK:-/var/tmp/stock-debian}
IMAGE=$WORK/bookworm-stock.img       # pristine image, kept for reruns
KERNEL=$WORK/vmlinuz                 # the image's kernel and initrd, booted directly by qemu
INITRD=$WORK/initrd.img
LOGS=$WORK/logs                      # full logs of the last run
RUN=$WORK/run                        # this run only: the VM's disk, ssh key, bundle; removed at the end
DISK=$RUN/disk.img
KEY=$RUN/id_ed25519
PORT=${STOCK_SSH_PORT:-2299}
MIRROR=${STOCK_MIRROR:-http://deb.debian.org/debian}
SIZE=${STOCK_DISK_SIZE:-20G}
MEM=${STOCK_MEM:-8G}
MOLECULE=${STOCK_MOLECULE:-1}
MOLECULE_TIMEOUT=${STOCK_MOLECULE_TIMEOUT:-5400}   # seconds; the scenario is stopped after that
COPY_HOST_CA=${STOCK_COPY_HOST_CA:-1}
REBUILD=${STOCK_REBUILD:-0}
RESUME=${STOCK_RESUME:-0}
BOOT_TIMEOUT=${STOCK_BOOT_TIMEOUT:-900}

# Lowest CPU and I/O priority for everything that does real work on this machine.
LOW=(nice -n 19 ionice -c3)

# Packages on top of debootstrap's default variant (which brings ifupdown, isc-dhcp-client, iproute2, ...).
STOCK_PACKAGES=linux-image-amd64,systemd-sysv,openssh-server,sudo,ca-certificates

# A throwaway VM on loopback: no host-key checks.
OPTS=(-i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
      -o ConnectTimeout=10 -o ServerAliveInterval=60 -o ServerAliveCountMax=10 -o BatchMode=yes)
GUEST_REPO=/root/atom-worker

STEPS=$LOGS/steps.tsv      # name, start (epoch seconds), seconds, exit code
FACTS=$LOGS/facts.tsv      # key, value

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# fact KEY VALUE: one line of $FACTS (a multi-line value is joined with " / ").
fact() { printf '%s\t%s\n' "$1" "${2//$'\n'/ / }" >>"$FACTS"; }

# run_step NAME CMD...: runs CMD with its output in $LOGS/NAME.log, records its wall time and exit code.
run_step() {
    local name=$1 t0 t1 rc secs
    shift
    log "step $name ..."
    t0=$(date +%s.%N)
    CURRENT_STEP="$name $t0"  # a stop by signal records this step's time so far (on_signal)
    # A subshell outside any `||`, so that `set -e` still stops CMD at its first failing command.
    set +e
    # Appended: a resumed run adds its leg to the same log.
    (set -e; "$@") >>"$LOGS/$name.log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "${t0%.*}" "$secs" "$rc" >>"$STEPS"
    CURRENT_STEP=""
    log "step $name: ${secs} s, exit $rc"
    return "$rc"
}

guest() { ssh "${OPTS[@]}" -p "$PORT" root@127.0.0.1 "$@"; }

to_guest() { scp -q "${OPTS[@]}" -P "$PORT" "$1" "root@127.0.0.1:$2"; }

# Prefixes each line of stdin with this machine's epoch second (make demo's phases are timed from these).
stamp() {
    local line
    while IFS= read -r line; do
        printf '%(%s)T %s\n' -1 "$line"
    done
}

# Busy CPU ticks of the whole machine so far (user, nice, system, irq, softirq, steal; not idle or iowait).
machine_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# CPU ticks qemu has used so far (its /proc/PID/stat utime + stime), or nothing when it is gone.
qemu_ticks() {
    local pid
    pid=$(cat "$RUN/qemu.id" 2>/dev/null) || return 0
    awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || true
}

# Records how much of the machine's CPU other work used while the VM ran (qemu's own use left out):
# whether the VM had the machine to itself is measured, not assumed.
record_sharing() {
    local busy0 t0 busy1 q now
    busy0=$(cat "$RUN/busy0" 2>/dev/null) || return 0
    t0=$(cat "$RUN/boot0")
    q=$(qemu_ticks)
    [[ -n $q ]] || return 0
    busy1=$(machine_busy)
    now=$(date +%s)
    # Paused spans of this leg (`pause`/`continue`): their time and the machine's busy ticks are left out.
    local ps=0 pb=0 start end busy
    while read -r start end busy; do
        ((start >= t0)) || continue
        ps=$((ps + end - start))
        pb=$((pb + busy))
    done < <(sed -n 's/^paused\t//p' "$FACTS")
    fact others_cpu_share "$(awk -v b="$((busy1 - busy0 - pb))" -v q="$q" -v s="$((now - t0 - ps))" -v n="$(nproc)" \
        'BEGIN { x = s > 0 ? (b - q) / (s * n * 100) : 0; if (x < 0) x = 0; printf "%.0f%%", 100 * x }')"
}

# pause | continue | stop: act on the run going on (its script's process group, and qemu, which runs in a
# group of its own so that stopping the script's group leaves the VM to be powered off cleanly).
control() {
    local pgid qemu
    pgid=$(cat "$WORK/script.pid" 2>/dev/null || true)
    if [[ -z $pgid ]] || ! kill -0 -- "-$pgid" 2>/dev/null; then
        echo "no run going on" >&2
        exit 1
    fi
    qemu=$(cat "$RUN/qemu.id" 2>/dev/null || true)
    case $1 in
    pause)
        [[ ! -f $RUN/paused-at ]] || { echo "already paused" >&2; exit 1; }
        kill -STOP -- "-$pgid"
        [[ -z $qemu ]] || kill -STOP "$qemu"
        echo "$(date +%s) $(machine_busy)" >"$RUN/paused-at"
        echo "paused (qemu ${qemu:-not started}, script group $pgid)" ;;
    continue)
        local at busy
        read -r at busy <"$RUN/paused-at" || { echo "not paused" >&2; exit 1; }
        [[ -z $qemu ]] || kill -CONT "$qemu"
        kill -CONT -- "-$pgid"
        fact paused "$at $(date +%s) $(($(machine_busy) - busy))"
        rm -f "$RUN/paused-at"
        echo "running again after $(($(date +%s) - at)) s" ;;
    stop)
        [[ ! -f $RUN/paused-at ]] || control continue
        kill -TERM -- "-$pgid"
        echo "stopping: the script powers the VM off and keeps its disk" ;;
    esac
}

# --- 1. the image ---------------------------------------------------------------------------------------

build_image() {
    local root=$WORK/root
    rm -rf "$root"
    mkdir -p "$root"
    "${LOW[@]}" debootstrap --include="$STOCK_PACKAGES" bookworm "$root" "$MIRROR"

    # What a cloud image's first boot would otherwise provide: a hostname, /etc/fstab, DHCP, a resolver.
    echo stock-debian >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tstock-debian\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$root/etc/hosts"
    echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
    printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/50-dhcp.network"
    chroot "$root" systemctl enable systemd-networkd.service
    # qemu's user network answers DNS on 10.0.2.3 (bookworm has no systemd-resolved by default).
    echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
    # The apt sources of a Debian 12 cloud image (debootstrap writes only the main suite).
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Root logs in with a key only (sshd's default for root); each run writes its own key here.
    install -d -m 700 "$root/root/.ssh"
    chroot "$root" apt-get clean

    # Proof that the image holds nothing of this project.
    # shellcheck disable=SC2016  # dpkg-query's format, not a shell expansion
    chroot "$root" dpkg-query -W -f='${Package}\n' | sort >"$WORK/image-packages.txt"

    cp -L "$root/vmlinuz" "$KERNEL"
    cp -L "$root/initrd.img" "$INITRD"
    rm -f "$IMAGE"
    truncate -s "$SIZE" "$IMAGE"
    "${LOW[@]}" mkfs.ext4 -q -F -L stock-root -d "$root" "$IMAGE"
    rm -rf "$root"
}

# --- 2. boot ---------------------------------------------------------------------------------------------

boot_vm() {
    # A run killed outright (not stopped) leaves its qemu's PID files behind: they name no VM of this boot.
    rm -f "$RUN/qemu.pid" "$RUN/qemu.id"
    machine_busy >"$RUN/busy0"
    date +%s >"$RUN/boot0"
    # cache=unsafe: the disk is this run's throwaway copy, so the guest's fsyncs (dpkg makes thousands) need
    # not reach this machine's disk; a crash of this machine loses the run either way.
    # In the background rather than -daemonize: qemu's own messages and how it ended (exit code, or 128 +
    # the signal that killed it; on SIGTERM qemu names the sender's PID) stay in qemu.log.
    (
        set +e
        "${LOW[@]}" setsid qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m "$MEM" \
            -kernel "$KERNEL" -initrd "$INITRD" -append "root=/dev/vda rw console=ttyS0" \
            -drive "file=$DISK,if=virtio,format=raw,cache=unsafe" \
            -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0 \
            -display none -monitor none -serial "file:$LOGS/console.log" -pidfile "$RUN/qemu.pid"
        echo "qemu exited with status $? at $(date -u +%H:%M:%S)"
    ) </dev/null >>"$LOGS/qemu.log" 2>&1 &
    local deadline=$((SECONDS + BOOT_TIMEOUT))
    until guest true 2>/dev/null; do
        if [[ -s $RUN/qemu.pid ]] && ! kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
            echo "qemu stopped: $(tail -n 1 "$LOGS/qemu.log")" >&2
            return 1
        fi
        if ((SECONDS > deadline)); then
            echo "no ssh after $BOOT_TIMEOUT s; see $LOGS/console.log" >&2
            return 1
        fi
        sleep 2
    done
    # qemu removes its pidfile when it exits: keep the PID where teardown can tell a dead VM from none.
    cp "$RUN/qemu.pid" "$RUN/qemu.id"
}

# This machine reaches HTTPS registries through a proxy with its own CA: the guest gets the same CA
# certificates and pip's `cert =` setting (apt uses plain http and the cloud image's own sources).
copy_host_ca() {
    local crt
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [[ -e $crt ]] || continue
        to_guest "$crt" /usr/local/share/ca-certificates/
    done
    if [[ -f /etc/pip.conf ]]; then
        to_guest /etc/pip.conf /etc/pip.conf
    fi
    guest update-ca-certificates
}

# --- 3. the README's Quick start -------------------------------------------------------------------------

clone_repo() {
    to_guest "$RUN/atom-worker.bundle" /root/atom-worker.bundle
    guest "git clone /root/atom-worker.bundle $GUEST_REPO && git -C $GUEST_REPO log --oneline -1"
}

# A stopped run's lab hosts are in whatever state the stop left them (a VM killed mid-converge leaves a
# host's dpkg interrupted): a resumed run removes them and keeps the golden image, as a new user's second
# `make demo` after `lab down` would.
lab_down() {
    guest "cd $GUEST_REPO && tools/lab/lab down 2>&1" | stamp
}

make_demo() {
    # The host stamps each line as it arrives; the "== " lines mark make demo's phases.
    guest "cd $GUEST_REPO && make demo 2>&1" | stamp
}

molecule_default() {
    timeout "$MOLECULE_TIMEOUT" ssh "${OPTS[@]}" -p "$PORT" root@127.0.0.1 \
        "cd $GUEST_REPO && tools/lab/lab exec -- env PATH=\$PWD/.venv/bin:\$PATH .venv/bin/molecule test -s default 2>&1" |
        stamp
}

guest_facts() {
    fact guest_cgroup_fs "$(guest stat -fc %T /sys/fs/cgroup)"
    fact guest_pid1 "$(guest cat /proc/1/comm)"
    fact guest_kernel "$(guest uname -r)"
    fact guest_systemd "$(guest systemctl --version | head -n1)"
    fact guest_system_state "$(guest systemctl is-system-running || true)"
    fact guest_nproc "$(guest nproc)"
}

# --- 5. results ------------------------------------------------------------------------------------------

write_results() {
    local status=$1
    python3 - "$STEPS" "$FACTS" "$LOGS" "$HERE" "$status" <<'PYEOF'
import json
import pathlib
import sys

steps_f, facts_f, logs, here, status = sys.argv[1:]
logs, here = pathlib.Path(logs), pathlib.Path(here)


def rows(path, n):
    p = pathlib.Path(path)
    if not p.exists():
        return []
    return [line.split("\t", n - 1) for line in p.read_text().splitlines() if line.count("\t") >= n - 1]


steps = [{"step": n, "start": int(t0), "seconds": float(s), "exit": int(rc)} for n, t0, s, rc in rows(steps_f, 4)]
facts = {k: v for k, v in rows(facts_f, 2)}
# Facts written once per leg (a resumed run adds a leg): every value, in order.
legs_of = {k: [v for k2, v in rows(facts_f, 2) if k2 == k] for k in ("others_cpu_share", "stopped_by", "resumed")}
# Spans the run was paused (`run.sh pause` ... `continue`): left out of every time below.
pauses = [tuple(int(x) for x in v.split()[:2]) for k, v in rows(facts_f, 2) if k == "paused"]


def paused_within(start, end):
    return sum(max(0, min(end, b) - max(start, a)) for a, b in pauses)


phases = []
stamped = logs / "make-demo.log"
if stamped.exists():
    lines = [line.split(" ", 1) for line in stamped.read_text().splitlines() if " " in line]
    # The Makefile's own marks only: tools/demo_status.py's section banners ("== jobs1: ... =====") are
    # part of the last phase.
    marks = [(int(t), text) for t, text in lines
             if text.startswith("== ") and not text.endswith("==") and t.isdigit()]
    # A phase ends at the next mark of the same leg, or when its leg did (the output may stop long before,
    # e.g. in a stopped run); each leg is one make-demo step.
    legs = [(s["start"], round(s["start"] + s["seconds"])) for s in steps if s["step"] == "make-demo"]

    def leg_end(t):
        return next((end for start, end in legs if start <= t <= end), None)

    for i, (t, text) in enumerate(marks):
        end = leg_end(t)
        nxt = marks[i + 1][0] if i + 1 < len(marks) else None
        if nxt is None or (end is not None and nxt > end):
            nxt = end
        leg = next((n for n, (start, e) in enumerate(legs, 1) if start <= t <= e), None)
        secs = (nxt - t - paused_within(t, nxt)) if nxt is not None else None
        phases.append({"phase": text[3:], "leg": leg, "seconds": secs})


def tail(name, n, keep=None):
    p = logs / name
    if not p.exists():
        return []
    out = [line.split(" ", 1)[1] if line[:10].isdigit() and " " in line else line
           for line in p.read_text(errors="replace").splitlines()]
    if keep:
        out = [line for line in out if keep(line)]
    return out[-n:]


cgroup_lines = tail("make-demo.log", 3, keep=lambda s: "cgroups:" in s)
result = {
    "recorded": facts.get("recorded"),
    "qemu_died_early": facts.get("qemu_died_early"),
    "status": status,
    "legs": {k: v for k, v in legs_of.items() if v},
    "paused": [{"from": a, "to": b} for a, b in pauses],
    "host": {k[5:]: v for k, v in facts.items() if k.startswith("host_")},
    "guest": {k[6:]: v for k, v in facts.items() if k.startswith("guest_")},
    "commit": facts.get("commit"),
    "steps": steps,
    "make_demo_phases": phases,
    "lab_cgroups_line": cgroup_lines[-1].strip() if cgroup_lines else None,
    "make_demo_last_lines": tail("make-demo.log", 12),
    "molecule_last_lines": tail("molecule-default.log", 8),
    "lab_status_after": tail("lab-status.log", 20),
}
(here / "results.json").write_text(json.dumps(result, indent=1) + "\n")

sec = {s["step"]: s for s in steps}


def t(name):
    runs = [s for s in steps if s["step"] == name]
    if not runs:
        return "not run"
    out = []
    stops = iter(legs_of["stopped_by"])  # one per leg ended by a signal (exit above 128), in order
    for s in runs:
        held = paused_within(s["start"], round(s["start"] + s["seconds"]))
        m, r = divmod(round(s["seconds"] - held), 60)
        took = f"{m} min {r} s" if m else f"{r} s"
        if held:
            took += f" (paused {held // 60} min besides, left out)"
        if s["exit"] != 0:
            # A leg ended by a signal is a stop, not a failure of the step.
            stop = next(stops, None) if s["exit"] > 128 else None
            took = f"stopped after {took} ({stop})" if stop else f"{took} (failed, exit {s['exit']})"
        out.append(took)
    return out[0] if len(out) == 1 else " + ".join(f"leg {n}: {x}" for n, x in enumerate(out, 1))


shares = legs_of["others_cpu_share"]
if shares:
    sharing = ("Other work used " + ", ".join(f"leg {n}: {x}" if len(shares) > 1 else x
                                           for n, x in enumerate(shares, 1))
               + " of the machine's CPU while the VM ran (qemu's own use left out, measured from /proc/stat)")
else:
    sharing = "How much other work ran beside the VM was not measured"


g = result["guest"]
h = result["host"]
md = [
    "# `make demo` on a stock Debian 12 VM (issue 12, section 1)",
    "",
    f"Recorded {result['recorded']} by `bench/stock-debian/run.sh` (status: **{status}**), commit "
    f"`{result['commit']}` cloned inside the VM.",
    "",
    f"Machine: {h.get('cpu')}, {h.get('nproc')} cores, kernel {h.get('kernel')}; load average at the end "
    f"{h.get('loadavg_end')}. {sharing}; qemu ran at `nice -n 19`, `ionice -c3`, so other work slows it and "
    "every time below is an upper bound. All of them are times under software emulation (qemu TCG, no KVM: this machine's /dev/kvm cannot boot a stock kernel), "
    "several times slower than the same steps on real hardware.",
    "",
    *([f"**The VM died before the end**: `{result['qemu_died_early']}`.", ""]
      if result["qemu_died_early"] else []),
    "## The VM",
    "",
    "- Image: `debootstrap` (default variant: Debian's required and important packages) of bookworm with "
    "`linux-image-amd64, systemd-sysv, openssh-server, sudo, ca-certificates`; systemd-networkd does DHCP on "
    "the virtio NIC; the apt sources of a Debian 12 cloud image (bookworm, bookworm-updates, "
    "bookworm-security on deb.debian.org). Not in it: " + facts.get("image_absent", "?") + ". "
    f"A raw ext4 file of {facts.get('disk_size')} (sparse), `mkfs.ext4 -d`.",
    f"- qemu {facts.get('qemu_version')}: `-accel tcg,thread=multi -cpu max -smp 2 -m {facts.get('mem')}`, "
    "kernel and initrd of the image booted directly, virtio disk (cache=unsafe: a throwaway copy) and NIC, user networking with ssh forwarded "
    "to 127.0.0.1 only.",
    f"- Inside: PID 1 is `{g.get('pid1')}`, `stat -fc %T /sys/fs/cgroup` is `{g.get('cgroup_fs')}`, "
    f"{g.get('systemd')}, kernel {g.get('kernel')}, `systemctl is-system-running`: {g.get('system_state')}; "
    f"before the Quick start, `/usr/bin/python3 -V`: {facts.get('guest_python_before', '?')}.",
    "- Copied in from this machine: " + (
        "its extra CA certificates (`/usr/local/share/ca-certificates`, then `update-ca-certificates`) and "
        "`/etc/pip.conf` (`cert = /etc/ssl/certs/ca-certificates.crt`): this machine reaches HTTPS "
        "registries (PyPI) through a proxy with its own CA. A new user's machine has working certificates "
        "of its own and does not need this. Nothing else: apt sources are the image's own."
        if facts.get("copied_host_ca") == "1" else "nothing."),
    "- The repository reached the VM as a `git bundle` of HEAD (`git bundle create ... HEAD main`), copied "
    "in with scp and cloned with `git clone`; uncommitted changes of the working tree were not in it.",
    "",
    "## Timings",
    "",
    "| step | what | time |",
    "| --- | --- | --- |",
    f"| build image | debootstrap + mkfs.ext4 on this machine (skipped when the kept image is reused) | "
    f"{t('build-image')} |",
    f"| boot | qemu start to the first successful ssh | {t('boot')} |",
    f"| host CA | CA certificates and pip.conf copied in | {t('host-ca')} |",
    f"| prerequisites | `apt-get update && apt-get install -y make git` (the README's first step) | "
    f"{t('prereq')} |",
    f"| clone | scp of the bundle, `git clone` | {t('clone')} |",
    f"| **make demo** | unchanged, in the clone | **{t('make-demo')}** |",
    f"| molecule | `tools/lab/lab exec -- env PATH=$PWD/.venv/bin:$PATH .venv/bin/molecule test -s default` "
    f"| {t('molecule-default')} |",
    "",
]
if phases:
    md += ["`make demo`'s phases (from the `== ` lines of its output, stamped on arrival):", "",
           "| phase | time |", "| --- | --- |"]
    for p in phases:
        s = p["seconds"]
        leg = f" (leg {p['leg']})" if p.get("leg") and len(legs_of["resumed"]) else ""
        md.append(f"| {p['phase']}{leg} | {'?' if s is None else f'{s // 60} min {s % 60} s'} |")
    md.append("")
md += [
    "## What the lab said and how `make demo` ended",
    "",
    f"The lab's cgroup line: `{result['lab_cgroups_line']}`",
    "",
    "Last lines of `make demo`:",
    "",
    "```",
    *result["make_demo_last_lines"],
    "```",
    "",
]
if result["lab_status_after"]:
    md += ["`tools/lab/lab status` and the hosts' scope units in the VM afterwards:", "", "```",
           *result["lab_status_after"], "```", ""]
if result["molecule_last_lines"]:
    md += ["Last lines of `molecule test -s default`:", "", "```", *result["molecule_last_lines"], "```", ""]
md += [
    *([f"The run was resumed (`STOCK_RESUME=1`: the kept disk booted again, the lab's hosts removed with "
       f"`lab down` (the golden image kept), `make demo` run again in the same clone) at {', '.join(legs_of['resumed'])}.", ""] if legs_of["resumed"] else []),
    "`make test` in full was not run: under TCG it would take hours (it takes about 35 minutes natively on "
    "this 2-core machine, and the first `make demo`, 5 min 30 s natively, took several times longer here).",
    "",
    "Full logs of the run are in `/var/tmp/stock-debian/logs/` on the machine that ran it; the pristine "
    "image, its kernel and initrd are kept in `/var/tmp/stock-debian/` for reruns (`STOCK_REBUILD=1` "
    "rebuilds it; `rm -rf /var/tmp/stock-debian` removes it). Raw figures: `results.json`. "
    "Re-run: `bench/stock-debian/run.sh` as root (needs qemu-system-x86 and debootstrap).",
]
(here / "results.md").write_text("\n".join(md) + "\n")
PYEOF
}

# --- teardown --------------------------------------------------------------------------------------------

teardown() {
    local keep=$1 pid="" i
    record_sharing
    if [[ -f $RUN/qemu.id ]]; then
        pid=$(cat "$RUN/qemu.id")
    elif [[ -f $RUN/qemu.pid ]]; then
        pid=$(cat "$RUN/qemu.pid")
    fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        fact qemu_died_early "$(tail -n 3 "$LOGS/qemu.log" 2>/dev/null)"
        log "qemu was no longer running: $(tail -n 1 "$LOGS/qemu.log" 2>/dev/null)"
    elif [[ -n $pid ]]; then
        log "powering the VM off"
        guest systemctl poweroff >/dev/null 2>&1 || true
        for ((i = 0; i < 120; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "qemu still running after 120 s: killing PID $pid"
            kill "$pid" 2>/dev/null || true
            sleep 2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$WORK/root"
    if ((keep)); then
        rm -f "$RUN/qemu.pid" "$RUN/qemu.id" "$RUN/atom-worker.bundle"
        log "kept the VM's disk in $RUN: STOCK_RESUME=1 $0 runs make demo again in it; rm -rf $RUN discards it"
    else
        rm -rf "$RUN"
    fi
}

# A run stopped by a signal says so (and by which), instead of passing for a failed step.
on_signal() {
    fact stopped_by "SIG$1 at $(date -u +%H:%M:%S)"
    # The step that was running: its time until the stop, with the signal's exit code (the results show
    # it as stopped, not as missing).
    if [[ -n ${CURRENT_STEP:-} ]]; then
        local name=${CURRENT_STEP% *} t0=${CURRENT_STEP#* }
        printf '%s\t%s\t%s\t%s\n' "$name" "${t0%.*}" \
            "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
            "$((128 + $(kill -l "$1")))" >>"$STEPS"
    fi
    exit $((128 + $(kill -l "$1")))
}

on_exit() {
    local rc=$?
    trap - EXIT
    local status=completed stopped keep=0
    if ((rc != 0)); then
        stopped=$(sed -n 's/^stopped_by\t//p' "$FACTS" | tail -n 1)
        status="stopped (exit $rc${stopped:+, $stopped})"
        # The disk is worth keeping once the Quick start has begun in it.
        [[ -f $RUN/disk.img && -f $RUN/cloned ]] && keep=1
    fi
    fact host_loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)"
    fact status "$status"
    teardown "$keep"
    write_results "$status" || log "writing the results failed"
    log "done ($status); results in $HERE/results.md, logs in $LOGS"
    exit "$rc"
}

# --- main ------------------------------------------------------------------------------------------------

main() {
    [[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
    case ${1:-} in
    pause | continue | stop) control "$1"; return ;;
    # The results again from the kept logs (after mending them, or the writer).
    results) write_results "$(sed -n 's/^status\t//p' "$FACTS" | tail -n 1)"; return ;;
    "") ;;
    *) echo "usage: $0 [pause|continue|stop|results]" >&2; exit 2 ;;
    esac
    # `stop` and `pause` signal this process group: the script must lead one.
    if [[ $(ps -o pgid= -p $$ | tr -d ' ') != "$$" ]]; then
        exec setsid "$0" "$@"
    fi
    if [[ -f $WORK/script.pid ]] && kill -0 -- "-$(cat "$WORK/script.pid")" 2>/dev/null; then
        echo "a run is going on (process group $(cat "$WORK/script.pid")): $0 stop first" >&2
        exit 1
    fi
    local tool
    for tool in qemu-system-x86_64 debootstrap mkfs.ext4 debugfs ssh-keygen python3; do
        command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-system-x86 debootstrap)" >&2; exit 1; }
    done
    if ss -Hltn "sport = :$PORT" | grep -q .; then
        echo "port $PORT is in use: set STOCK_SSH_PORT" >&2
        exit 1
    fi
    mkdir -p "$WORK"
    if [[ $RESUME == 1 ]]; then
        [[ -f $RUN/disk.img && -f $RUN/cloned && -f $LOGS/facts.tsv ]] ||
            { echo "nothing to resume: no disk kept from a stopped run in $RUN" >&2; exit 1; }
    else
        rm -rf "$LOGS" "$RUN"
        mkdir -p "$LOGS" "$RUN"
    fi
    echo $$ >"$WORK/script.pid"
    trap on_exit EXIT
    trap 'on_signal TERM' TERM
    trap 'on_signal INT' INT
    trap 'on_signal HUP' HUP

    if [[ $RESUME == 1 ]]; then
        fact resumed "$(date -u '+%Y-%m-%d %H:%M UTC')"
        fact host_loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
        run_step boot boot_vm
        run_step lab-down lab_down
        run_step make-demo make_demo
        finish
        return
    fi

    fact recorded "$(date -u '+%Y-%m-%d %H:%M UTC')"
    fact host_cpu "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
    fact host_nproc "$(nproc)"
    fact host_kernel "$(uname -r)"
    fact host_loadavg_start "$(cut -d' ' -f1-3 /proc/loadavg)"
    fact qemu_version "$(qemu-system-x86_64 --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')"
    fact disk_size "$SIZE"
    fact mem "$MEM"
    fact commit "$(git -C "$REPO" rev-parse --short HEAD)"
    fact copied_host_ca "$COPY_HOST_CA"

    if [[ $REBUILD == 1 || ! -f $IMAGE || ! -f $KERNEL || ! -f $INITRD ]]; then
        run_step build-image build_image
    fi
    local absent pkg
    # shellcheck disable=SC2016  # literal backquotes: Markdown code spans
    absent=$(for pkg in git make python3 python3-venv python3-pip gcc debootstrap systemd-container; do
                 grep -qx "$pkg" "$WORK/image-packages.txt" || printf '`%s` ' "$pkg"
             done)
    fact image_absent "${absent% }"

    # This run's disk (a sparse copy of the pristine image) and its own ssh key, written into the copy.
    "${LOW[@]}" cp --sparse=always "$IMAGE" "$DISK"
    ssh-keygen -q -t ed25519 -N '' -C stock-debian-bench -f "$KEY"
    debugfs -w -R "write $KEY.pub /root/.ssh/authorized_keys" "$DISK" >/dev/null 2>&1
    git -C "$REPO" bundle create "$RUN/atom-worker.bundle" HEAD main 2>"$LOGS/bundle.log"

    run_step boot boot_vm
    guest_facts
    fact guest_python_before "$(guest '/usr/bin/python3 -V 2>/dev/null || echo "absent (no /usr/bin/python3)"')"
    if [[ $COPY_HOST_CA == 1 ]]; then
        run_step host-ca copy_host_ca
    fi

    run_step prereq guest 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y make git'
    run_step clone clone_repo
    touch "$RUN/cloned"
    run_step make-demo make_demo
    finish
}

# After make demo: one Molecule scenario, and the lab's view.
finish() {
    if [[ $MOLECULE == 1 ]]; then
        # Optional: its failure (or timeout, exit 124) is recorded, not fatal.
        run_step molecule-default molecule_default || log "molecule test -s default failed or timed out"
    fi
    # The lab's view after all of it (its first line names the cgroup world), and its hosts' units.
    guest "cd $GUEST_REPO && tools/lab/lab status; systemctl list-units --no-pager 'atom-lab-*'" \
        >"$LOGS/lab-status.log" 2>&1 || true
}

main "$@"
