"""Model files: where they live, how they are fetched, and how they are read safely.

``models/assets.json`` is the one manifest.  Its ``assets`` are third-party files (path, upstream URL
pinned to a commit, sha256, size, licence), never committed; its ``bundled`` entries are the project's
own trained files that sit beside it in ``models/`` (path, sha256, size, licence, the ``role`` the
pipeline loads them for and their ``meta``data), verified the same way by ``bundled``.
``fetch_assets`` downloads the third-party files into the cache folder, or copies them from the folder named
by ``$FG3D_ASSET_MIRROR`` (same relative layout), checking every sha256.  ``asset_path`` returns a
verified path or raises one clear line.  Pickles are read once with a restricted unpickler that admits
only dicts and numpy arrays and are cached as ``.npz``; nothing foreign is ever unpickled freely.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import numpy as np
from numpy.core.multiarray import _reconstruct  # what numpy's array pickles call

from .errors import FG3DError

MIRROR_ENV = "FG3D_ASSET_MIRROR"
CACHE_ENV = "FG3D_CACHE_DIR"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """The ``models`` folder: inside the package when installed from the add-on zip, else the repo's."""
    for cand in (_PACKAGE_DIR / "models", _PACKAGE_DIR.parent / "models"):
        if (cand / "assets.json").is_file():
            return cand
    raise FG3DError(f"models/assets.json not found next to {_PACKAGE_DIR}: the installation is incomplete")


MANIFEST = "assets.json"


def _manifest_data(models: Optional[Path] = None) -> dict:
    return json.loads(((models or models_dir()) / MANIFEST).read_text(encoding="utf-8"))


def manifest() -> Dict[str, dict]:
    """The third-party assets by path."""
    return {a["path"]: a for a in _manifest_data()["assets"]}


def bundled(role: str) -> Optional[dict]:
    """The bundled file for ``role`` (e.g. ``"fgnet"``) with its verified local ``file`` path, or None
    when the manifest names none or its file is absent.  FG3DError when the file is corrupt."""
    try:
        models = models_dir()
    except FG3DError:
        return None
    entry = next((b for b in _manifest_data(models).get("bundled", []) if b["role"] == role), None)
    if entry is None or not (models / entry["path"]).is_file():
        return None
    path = models / entry["path"]
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise FG3DError(
            f"{path} is corrupt (sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…); "
            "restore the file" + (" or run with --no-refine" if role == "fgnet" else "")
        )
    return dict(entry, file=str(path))


def write_bundled(models: Path, entry: dict) -> None:
    """Record ``entry`` (``role``, ``path``, …) in ``models/assets.json``, replacing that role's entry."""
    data = _manifest_data(models)
    data["bundled"] = [b for b in data.get("bundled", []) if b["role"] != entry["role"]] + [entry]
    tmp = models / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, models / MANIFEST)


def cache_dir() -> Path:
    """Asset cache: ``$FG3D_CACHE_DIR``, else ``$XDG_CACHE_HOME/fg3d_blender``, else
    ``~/.cache/fg3d_blender``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fg3d_blender"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_verified: Dict[str, Path] = {}


def _how_to_get(rel: str) -> str:
    return (
        f"run `python -m fg3d_blender fetch-assets` (downloads from upstream), or set {MIRROR_ENV} "
        f"to a folder holding {rel}"
    )


def asset_path(rel: str) -> Path:
    """Verified local path of a manifest asset; raises FG3DError naming the file, the place and the fix."""
    if rel in _verified:
        return _verified[rel]
    entry = manifest().get(rel)
    if entry is None:
        raise FG3DError(f"unknown asset {rel!r} (not in models/assets.json)")
    path = cache_dir() / rel
    if not path.is_file():
        mirror = os.environ.get(MIRROR_ENV)
        if mirror and (Path(mirror) / rel).is_file():
            _install_one(entry, None)
        else:
            where = f"{path}" + (f" or {Path(mirror) / rel}" if mirror else "")
            raise FG3DError(f"asset {rel} is missing (looked in {where}); {_how_to_get(rel)}")
    if path.stat().st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
        raise FG3DError(
            f"asset {rel} at {path} is corrupt (sha256 mismatch); delete it and " + _how_to_get(rel)
        )
    _verified[rel] = path
    return path


def _install_one(entry: dict, progress: Optional[Callable[[str], None]]) -> Path:
    rel = entry["path"]
    dest = cache_dir() / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get(MIRROR_ENV)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    os.close(fd)
    try:
        if mirror:
            src = Path(mirror) / rel
            if not src.is_file():
                raise FG3DError(f"asset {rel} is not in the mirror {mirror} (set by {MIRROR_ENV})")
            if progress:
                progress(f"copy {rel} from {mirror}")
            shutil.copyfile(src, tmp)
        else:
            if progress:
                progress(f"download {rel} ({entry['size']} bytes)")
            try:
                with urllib.request.urlopen(entry["url"], timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as exc:
                raise FG3DError(
                    f"could not download {rel} from {entry['url']}: {exc}; "
                    f"set {MIRROR_ENV} to a folder that holds the model files"
                ) from None
        digest = sha256_of(Path(tmp))
        if digest != entry["sha256"]:
            raise FG3DError(
                f"asset {rel} has sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…; "
                "the source is corrupt or changed"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_assets(
    include_optional: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    only: Optional[Iterable[str]] = None,
) -> int:
    """Make every required asset present and verified in the cache; returns how many were installed."""
    installed = 0
    wanted = set(only) if only is not None else None
    for rel, entry in manifest().items():
        if wanted is not None and rel not in wanted:
            continue
        if not entry.get("required", True) and not include_optional and wanted is None:
            continue
        dest = cache_dir() / rel
        if dest.is_file() and dest.stat().st_size == entry["size"] and sha256_of(dest) == entry["sha256"]:
            continue
        _install_one(entry, progress)
        installed += 1
    _verified.clear()
    return installed


def dlib_model_path(name: str) -> Path:
    """A model file shipped by the face-recognition-models wheel, found without importing the package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FG3DError(
            "face-recognition-models is not installed (it ships dlib's landmark model): "
            "pip install face-recognition-models==0.3.0"
        )
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "models" / name
        if cand.is_file():
            return cand
    raise FG3DError(f"{name} not found in the face-recognition-models package; reinstall it")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers, nothing else (no code can run)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return {"_reconstruct": _reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a foreign pickle")


def load_pickled_arrays(rel: str) -> Dict[str, np.ndarray]:
    """Read a foreign pickle of a dict of arrays once (restricted) and cache it as .npz beside it."""
    src = asset_path(rel)
    npz = src.with_suffix(".npz")
    if not npz.is_file() or npz.stat().st_mtime < src.stat().st_mtime:
        with open(src, "rb") as f:
            data = _ArrayOnlyUnpickler(f, encoding="latin1").load()
        if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
            raise FG3DError(f"asset {rel} is not a dict of arrays")
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=npz.parent)
        os.close(fd)
        np.savez(tmp, **data)
        os.replace(tmp, npz)
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def derived_path(name: str) -> Path:
    """Where arrays computed once from the assets are cached."""
    d = cache_dir() / "derived"
    d.mkdir(parents=True, exist_ok=True)
    return d / name
