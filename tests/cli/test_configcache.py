"""The configuration cache (atom_workerctl.configcache): a site's parsed config/*.yml is kept under the files'
identity, read back without PyYAML, and missed by every kind of change. Local: no lab host needed (runs as
root, as the CLI does; the cache folder is the test's own)."""

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from atom_workerctl import atomconfig, configcache, sfyaml  # noqa: E402
from atom_workerctl.errors import ConfigError  # noqa: E402

GEARMAN = "all:\n  servers:\n    default: gearmand-a:4730\n  worker_types:\n    general: [arFindingAidJob]\n"


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An AtoM root with config/gearman.yml, and the cache in a folder of the test's own. SETTLE_NS 0: the
    files just written may be kept (test_a_file_changed_a_moment_ago_is_not_kept checks the real value)."""
    if os.geteuid() != 0:
        pytest.fail("the configuration cache is root's: run the tests as root, as make test does")
    monkeypatch.setattr(configcache, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(configcache, "SETTLE_NS", 0)
    root = tmp_path / "atom"
    (root / "config").mkdir(parents=True)
    (root / "config" / "gearman.yml").write_text(GEARMAN)
    return root


def cache_file(tmp_path) -> Path:
    return tmp_path / "cache" / configcache.CACHE_FILE


def no_parsing(monkeypatch):
    """From now on, parsing YAML fails the test: what comes back must come from the cache."""
    def refuse(text):
        raise AssertionError("parsed YAML although the files did not change")
    monkeypatch.setattr(sfyaml, "loads", refuse)


def servers(root):
    return atomconfig.read_config(str(root), "gearman")[0]["servers"]


def test_an_unchanged_configuration_is_read_back_without_parsing(site, tmp_path, monkeypatch):
    first = atomconfig.read_config(str(site), "gearman")
    assert first[0]["servers"] == {"default": "gearmand-a:4730"}
    assert cache_file(tmp_path).is_file() and (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert cache_file(tmp_path).stat().st_mode & 0o777 == 0o600
    no_parsing(monkeypatch)
    assert atomconfig.read_config(str(site), "gearman") == first
    # The control: the refusing parser is the one read_config calls, so a miss would have failed here.
    (site / "config" / "app.yml").write_text("all:\n  workers_key: k\n")
    with pytest.raises(AssertionError, match="parsed YAML"):
        atomconfig.read_config(str(site), "app")


def test_the_cache_spares_pyyaml_import(site, monkeypatch):
    (site / "config" / "app.yml").write_text("all:\n  workers_key: k\n")
    atomconfig.SiteConfig(str(site))
    for name in [m for m in sys.modules if m == "yaml" or m.startswith(("yaml.", "atom_workerctl.sfyaml"))]:
        monkeypatch.delitem(sys.modules, name)
    config = atomconfig.SiteConfig(str(site))
    assert config.servers == ["gearmand-a:4730"] and config.worker_types == {"general": ["arFindingAidJob"]}
    assert "yaml" not in sys.modules and "atom_workerctl.sfyaml" not in sys.modules


def test_every_kind_of_change_misses(site, monkeypatch):
    path = site / "config" / "gearman.yml"
    assert servers(site) == {"default": "gearmand-a:4730"}
    # The same size and the old mtime put back: only the ctime tells (the kernel's tick is its grain).
    before = path.stat()
    time.sleep(0.05)
    path.write_text(GEARMAN.replace("gearmand-a", "gearmand-b"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert servers(site) == {"default": "gearmand-b:4730"}
    # Replaced by another file (rename over it).
    other = site / "config" / "gearman.yml.new"
    other.write_text(GEARMAN.replace("gearmand-a", "gearmand-c"))
    os.replace(other, path)
    assert servers(site) == {"default": "gearmand-c:4730"}
    # A file where there was none: apps/qubit/config/gearman.yml is merged over config/.
    (site / "apps/qubit/config").mkdir(parents=True)
    (site / "apps/qubit/config/gearman.yml").write_text("all:\n  servers:\n    default: gearmand-d:4730\n")
    assert servers(site) == {"default": "gearmand-d:4730"}
    # And removed again.
    (site / "apps/qubit/config/gearman.yml").unlink()
    assert servers(site) == {"default": "gearmand-c:4730"}
    # Unchanged since: read back without parsing.
    no_parsing(monkeypatch)
    assert servers(site) == {"default": "gearmand-c:4730"}


def test_a_file_changed_a_moment_ago_is_not_kept(site, tmp_path, monkeypatch):
    monkeypatch.setattr(configcache, "SETTLE_NS", 2_000_000_000)
    assert servers(site) == {"default": "gearmand-a:4730"}
    assert not cache_file(tmp_path).exists()
    # The control: once the file is older than SETTLE_NS (here: the limit moved instead of the clock), it is.
    monkeypatch.setattr(configcache, "SETTLE_NS", 0)
    servers(site)
    assert cache_file(tmp_path).is_file()


@pytest.mark.parametrize("unsafe", ["open to others", "not root", "a link"])
def test_no_cache_where_it_would_not_be_root_s_alone(site, tmp_path, monkeypatch, unsafe):
    folder = tmp_path / "cache"
    if unsafe == "open to others":
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
    elif unsafe == "not root":
        monkeypatch.setattr(configcache.os, "geteuid", lambda: 1000)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    assert servers(site) == {"default": "gearmand-a:4730"}
    assert not cache_file(tmp_path).exists() and not (tmp_path / "elsewhere" / configcache.CACHE_FILE).exists()
    # Still read right, every time.
    assert servers(site) == {"default": "gearmand-a:4730"}


def test_a_damaged_cache_file_is_ignored_and_replaced(site, tmp_path, monkeypatch):
    servers(site)
    cache_file(tmp_path).write_bytes(b"\x00garbage")
    assert servers(site) == {"default": "gearmand-a:4730"}
    no_parsing(monkeypatch)
    assert servers(site) == {"default": "gearmand-a:4730"}  # rewritten whole by the read before


def test_what_the_reader_refuses_is_refused_as_before_and_not_kept(site, tmp_path):
    path = site / "config" / "gearman.yml"
    real = site / "config" / "real.yml"
    path.rename(real)
    path.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        servers(site)
    path.unlink()
    path.write_text("all: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        servers(site)
    assert not cache_file(tmp_path).exists()


def test_an_upgraded_parser_never_reads_an_older_parse(site, tmp_path, monkeypatch):
    """The parser's own files are in the key: after an upgrade of atom-workerctl (its files replaced), the
    configuration is parsed again even though it did not change."""
    parser = tmp_path / "sfyaml.py"
    parser.write_text("# version 1\n")
    monkeypatch.setattr(atomconfig, "PARSER_FILES", [str(parser)])
    servers(site)
    refusing = monkeypatch.context()
    with refusing as m:  # the control: unchanged parser and files, read back without parsing
        m.setattr(sfyaml, "loads", lambda text: (_ for _ in ()).throw(AssertionError("parsed")))
        assert servers(site) == {"default": "gearmand-a:4730"}
    new = tmp_path / "sfyaml.py.new"
    new.write_text("# version 2\n")
    os.replace(new, parser)  # as pip installs a file
    no_parsing(monkeypatch)
    with pytest.raises(AssertionError, match="parsed YAML"):
        servers(site)
