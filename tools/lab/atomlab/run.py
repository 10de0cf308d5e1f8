"""Running commands, with one readable error when they fail."""
import subprocess
import sys


class LabError(Exception):
    """A lab step failed; the message says which and why, in one line."""


def run(args, check=True, capture=False, input_text=None, quiet=False):
    """Run args; raise LabError naming the command and its stderr on failure."""
    proc = subprocess.run(  # noqa: PLW1510 - the return code is checked below, with the message
        args,
        input=input_text,
        text=True,
        stdout=subprocess.PIPE if capture else (subprocess.DEVNULL if quiet else None),
        stderr=subprocess.PIPE,
    )
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()
        tail = err[-1] if err else f"exit {proc.returncode}"
        raise LabError(f"{' '.join(map(str, args[:4]))}…: {tail}")
    return proc


def progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)
