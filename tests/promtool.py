"""The promtool binary the monitoring tests run: Debian's, unpacked by `make promtool` (not installed)."""
import os
from pathlib import Path

PROMTOOL = Path(__file__).resolve().parents[1] / "build/prometheus/usr/bin/promtool"


def promtool_path() -> Path:
    """build/prometheus/usr/bin/promtool under the repository; an error naming the make target if it is missing."""
    if not os.access(PROMTOOL, os.X_OK):
        raise FileNotFoundError(f"{PROMTOOL} is missing or not executable: run `make promtool` (it unpacks Debian's "
                                "prometheus package into build/prometheus without installing it)")
    return PROMTOOL
