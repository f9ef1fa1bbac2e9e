"""`pip install .` puts one package, `canopy`, in site-packages: the wheel built from the
repository, installed into an empty directory and imported from outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

REPO_FOLDERS = ("cluster", "learner", "actors", "cache", "replay")


def test_the_wheel_installs_only_canopy_and_it_imports(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = tmp_path.glob("canopy_rl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        names = set(z.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"canopy"}
    assert not tops & set(REPO_FOLDERS)
    assert {"canopy/__init__.py", "canopy/config.py", "canopy/replay/protocol.py"} <= names
    assert "canopy/cluster/bench/zoo.py" in names and "canopy/learner/algorithms/dqn.py" in names

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site), wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) in (
        ["canopy"],
        ["bin", "canopy"],  # the `canopy` console script
    )
    probe = (
        "import canopy, canopy.replay.protocol, canopy.cluster.cli; "
        "print(canopy.__version__, canopy.replay.protocol.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,  # not the checkout: only the installed copy can answer
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    version, path = run.stdout.split()
    assert version and Path(path).is_relative_to(site)
