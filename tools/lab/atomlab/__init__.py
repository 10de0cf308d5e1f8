"""The lab: Debian hosts with systemd as PID 1, booted with systemd-nspawn on this machine."""
