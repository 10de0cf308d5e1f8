"""Errors the CLI turns into one readable line on stderr and an exit code (never a traceback)."""

# Exit codes, as systemctl's where they overlap (systemctl is-active / status).
EXIT_OK = 0
EXIT_ERROR = 1          # anything that kept the command from doing its job
EXIT_USAGE = 2          # bad command line (argparse's own code)
EXIT_NOT_ACTIVE = 3     # status: some instance not active; doctor: faults found; waits that timed out
EXIT_NO_SUCH = 4        # no such site, pool or instance


class WorkerctlError(Exception):
    """An error with a message meant for the operator and the exit code it maps to."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(WorkerctlError):
    """sites.json, config/gearman.yml or config/app.yml missing or malformed."""


class NoSuchError(WorkerctlError):
    """An unknown site, pool or instance."""

    exit_code = EXIT_NO_SUCH


class ManagerError(WorkerctlError):
    """The process manager (systemd over D-Bus) refused or is unreachable."""


class GearmanError(WorkerctlError):
    """gearmand unreachable, refusing, timing out or answering nonsense."""

    def __init__(self, server: str, message: str):
        super().__init__(f"gearmand {server}: {message}")
        self.server = server
        self.reason = message


class TimeoutWaiting(WorkerctlError):
    """A bounded wait (registration with gearmand, a unit starting) ran out."""

    exit_code = EXIT_NOT_ACTIVE
