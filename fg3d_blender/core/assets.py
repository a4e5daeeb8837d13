"""Model files: where they live, how they are fetched, and how they are read safely.

``models/assets.json`` is the one manifest.  Its ``assets`` are third-party files (path, upstream URL
pinned to a commit, sha256, size, licence), never committed; its ``bundled`` entries are the project's
own trained files that sit beside it in ``models/`` (path, sha256, size, licence, the ``role`` the
pipeline loads them for and their ``meta``data), verified the same way by ``bundled``.
``fetch_assets`` downloads the third-party files into the cache folder, or copies them from the folder named
by ``$FG3D_ASSET_MIRROR`` (same relative layout), checking every sha256.  ``asset_path`` returns a
verified path or raises one clear line.  Pickles are read once with a restricted unpickler that admits
only dicts and numpy arrays and are cached as ``.npz``; nothing foreign is ever unpickled freely.
Arrays computed from the assets (``load_derived``) and other derived files (``derived_file``) are cached
with a sha256 beside them: a damaged or tampered file is rebuilt, and a read-only cache only means they
are recomputed in memory.  Large arrays read in part (``load_mapped``: dlib's landmark trees) are
memory-mapped and checked by their headers and by the caller instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional

from .atomic import atomic_file, remove_stale
from .errors import FG3DError

if TYPE_CHECKING:  # numpy is imported where arrays are read: the add-on's preferences and its dependency
    import numpy as np  # check read the manifest in a Blender that has no numpy yet

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
    with atomic_file(models / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def cache_dir() -> Path:
    """Asset cache: ``$FG3D_CACHE_DIR``, else ``$XDG_CACHE_HOME/fg3d_blender``, else
    ``~/.cache/fg3d_blender``.  FG3DError when that path is a file."""
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "fg3d_blender"
    if path.exists() and not path.is_dir():
        raise FG3DError(
            f"the asset cache {path} is a file, not a folder; set {CACHE_ENV} (in Blender: the add-on's "
            "Asset cache folder) to a folder"
        )
    return path


def _cache_error(path: Path, exc: OSError) -> FG3DError:
    return FG3DError(
        f"cannot write to the asset cache {path} ({exc.strerror or exc}); set {CACHE_ENV} (in Blender: "
        "the add-on's Asset cache folder) to a folder you can write"
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_verified: Dict[Path, float] = {}  # verified asset files → their mtime when verified


def _how_to_get(rel: str) -> str:
    return (
        f"run `python -m fg3d_blender fetch-assets` (downloads from upstream), or set {MIRROR_ENV} "
        f"to a folder holding {rel}"
    )


def asset_path(rel: str) -> Path:
    """Verified local path of a manifest asset; raises FG3DError naming the file, the place and the fix."""
    path = cache_dir() / rel
    try:
        if _verified.get(path) == path.stat().st_mtime:  # the same file, unchanged since it was checked
            return path
    except OSError:
        pass
    entry = manifest().get(rel)
    if entry is None:
        raise FG3DError(f"unknown asset {rel!r} (not in models/assets.json)")
    if not path.is_file():
        mirror = os.environ.get(MIRROR_ENV)
        if mirror and (Path(mirror) / rel).is_file():
            _install_one(entry, None)
        else:
            where = f"{path}" + (f" or {Path(mirror) / rel}" if mirror else "")
            raise FG3DError(f"asset {rel} is missing (looked in {where}); {_how_to_get(rel)}")
    stat = path.stat()
    if stat.st_size != entry["size"] or sha256_of(path) != entry["sha256"]:
        raise FG3DError(
            f"asset {rel} at {path} is corrupt (sha256 mismatch); delete it and " + _how_to_get(rel)
        )
    _verified[path] = stat.st_mtime
    return path


def _mirror() -> Optional[Path]:
    """The mirror folder named by ``$FG3D_ASSET_MIRROR``; FG3DError when it is set but not a folder."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    if not Path(mirror).is_dir():
        raise FG3DError(f"{MIRROR_ENV}={mirror}: no such folder (unset it to download from upstream)")
    return Path(mirror)


def _install_one(entry: dict, progress: Optional[Callable[[str], None]]) -> Path:
    rel = entry["path"]
    dest = cache_dir() / rel
    mirror = _mirror()
    if mirror and not (mirror / rel).is_file():
        raise FG3DError(f"asset {rel} is not in the mirror {mirror} (set by {MIRROR_ENV})")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest.parent)
        with atomic_file(dest) as tmp:
            if mirror:
                if progress:
                    progress(f"copy {rel} from {mirror}")
                shutil.copyfile(mirror / rel, tmp)
            else:
                if progress:
                    progress(f"download {rel} ({entry['size']} bytes)")
                _download(entry, tmp)
            digest = sha256_of(tmp)
            if digest != entry["sha256"]:
                raise FG3DError(
                    f"asset {rel} has sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…; "
                    "the source is corrupt or changed"
                )
    except OSError as exc:
        raise _cache_error(dest.parent, exc) from None
    return dest


def _download(entry: dict, tmp: Path) -> None:
    import urllib.request  # only when a file is downloaded: ~20 ms of every start otherwise

    try:
        with urllib.request.urlopen(entry["url"], timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as exc:
        if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (28, 30):  # ENOSPC, EROFS
            raise
        raise FG3DError(
            f"could not download {entry['path']} from {entry['url']}: {exc}; "
            f"set {MIRROR_ENV} to a folder that holds the model files"
        ) from None


def fetch_assets(
    include_optional: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    only: Optional[Iterable[str]] = None,
) -> int:
    """Make every required asset present and verified in the cache; returns how many were installed."""
    installed = 0
    _mirror()  # a mirror that is not there: one line before anything is made
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
        import numpy as np  # see the note at the imports: only array readers need numpy
        from numpy.core.multiarray import _reconstruct  # what numpy's array pickles call

        if (module, name) in self._ALLOWED:
            return {"_reconstruct": _reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from a foreign pickle")


def load_pickled_arrays(rel: str) -> Dict[str, np.ndarray]:
    """Read a foreign pickle of a dict of arrays once (restricted) and cache it as a derived .npz."""
    import numpy as np  # see the note at the imports

    src = asset_path(rel)
    entry = manifest()[rel]

    def unpickle() -> Dict[str, np.ndarray]:
        with open(src, "rb") as f:
            data = _ArrayOnlyUnpickler(f, encoding="latin1").load()
        if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()):
            raise FG3DError(f"asset {rel} is not a dict of arrays")
        return data

    name = f"{Path(rel).stem}.{entry['sha256'][:12]}.npz"  # a new asset version gets a new file
    return load_derived(name, unpickle)


def load_mat_arrays(rel: str) -> Dict[str, np.ndarray]:
    """A MATLAB asset's arrays, read once with scipy.io and cached as a derived .npz (a reconstruction
    then never imports scipy.io, ~0.08 s of every cold start)."""
    entry = manifest()[rel]

    def read() -> Dict[str, np.ndarray]:
        import scipy.io  # only when the derived file is made

        arrays = {k: v for k, v in scipy.io.loadmat(asset_path(rel)).items() if not k.startswith("__")}
        odd = [k for k, v in arrays.items() if v.dtype.hasobject]  # structs, cells: no pickle-free npz
        if odd:
            raise FG3DError(f"asset {rel}: {', '.join(odd)} not a plain array (MATLAB struct or cell)")
        return arrays

    return load_derived(f"{Path(rel).stem}.mat.{entry['sha256'][:12]}.npz", read)


def derived_path(name: str) -> Path:
    """Where arrays computed once from the assets are cached (the folder is made when it can be)."""
    d = cache_dir() / "derived"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache: load_derived then works in memory
        pass
    return d / name


def load_derived(name: str, build: Callable[[], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The arrays cached as ``derived/<name>``, or ``build()``'s, which are then cached.

    Each file has its sha256 in ``<name>.sha256``; a file that does not match (damaged, tampered, half
    copied) or does not load is rebuilt.  When the cache cannot be written (read-only, full) the arrays
    are returned all the same, and built again next time."""
    import numpy as np  # see the note at the imports

    path = derived_path(name)
    try:
        if _digest_matches(path):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):  # unreadable or not an npz: build it again
        pass
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _write_with_digest(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))
    return arrays


def _digest_matches(path: Path) -> bool:
    """``path`` is a file whose sha256 is the one kept beside it in ``<name>.sha256``."""
    try:
        digest = path.with_name(path.name + ".sha256").read_text(encoding="ascii").strip()
        return path.is_file() and digest == sha256_of(path)
    except (OSError, ValueError):
        return False


def _write_with_digest(path: Path, write: Callable[[Path], None]) -> bool:
    """``write(tmp)``, then ``path`` and its ``.sha256`` beside it, each atomically; False when that
    cannot be done (a read-only or full cache, or ``write`` failing)."""
    try:
        remove_stale(path.parent)
        with atomic_file(path) as tmp:
            write(tmp)
            digest = sha256_of(tmp)
        with atomic_file(path.with_name(path.name + ".sha256")) as tmp:
            tmp.write_text(digest + "\n", encoding="ascii")
    except Exception:  # noqa: BLE001 - any writer's failure (dlib raises RuntimeError on a full disk)
        return False
    return True


def derived_file(name: str, write: Callable[[Path], None]) -> Optional[Path]:
    """``derived/<name>``, made by ``write(tmp)`` when it is missing or does not match the sha256 kept
    beside it; None when it cannot be written (a read-only or full cache, or ``write`` failing: the
    caller then makes the thing in memory)."""
    path = derived_path(name)
    return path if _digest_matches(path) or _write_with_digest(path, write) else None


def load_mapped(
    stem: str,
    version: str,
    keys: Iterable[str],
    build: Callable[[], Dict[str, np.ndarray]],
    valid: Callable[[Dict[str, np.ndarray]], bool],
) -> Dict[str, np.ndarray]:
    """Large derived arrays that are read in part, each ``derived/<stem>.<version>.<key>.npy``,
    memory-mapped read-only: pages are read when used, and no sha256 is taken (for the 65 MB of dlib's
    landmark trees it would cost ~90 ms of every start, and a face reads about a third of them).
    numpy checks each file's header and size; ``valid`` checks what the caller's code relies on
    (shapes, index ranges).  Files of other versions are deleted when a new one is written.  Missing,
    unreadable or invalid files are built again; when the cache cannot be written the arrays are
    returned in memory, and built again next time."""
    import numpy as np  # see the note at the imports

    keys = list(keys)
    base = derived_path(f"{stem}.{version}")
    paths = {k: base.with_name(f"{base.name}.{k}.npy") for k in keys}
    try:
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
        if valid(arrays):
            return arrays
    except (OSError, ValueError, EOFError):
        pass
    arrays = build()
    try:
        remove_stale(base.parent)
        for k, p in paths.items():
            with atomic_file(p) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arrays[k]), allow_pickle=False)
    except (OSError, FG3DError):
        return arrays
    for old in base.parent.glob(f"{stem}.*.npy"):  # after the new ones are complete
        if old not in paths.values():
            try:
                old.unlink()
            except OSError:  # e.g. mapped by another process on Windows: next time
                pass
    return arrays


def asset_report() -> Dict[str, str]:
    """Each required asset's state without reading it: ``verified`` (sha256 checked in this process),
    ``present`` (the right size, checked at first use), ``in mirror`` (copied at first use),
    ``wrong size`` or ``missing``."""
    mirror = os.environ.get(MIRROR_ENV)
    root = cache_dir()
    out: Dict[str, str] = {}
    for rel, entry in manifest().items():
        if not entry.get("required", True):
            continue
        path = root / rel
        try:
            st = path.stat()
        except OSError:
            out[rel] = "in mirror" if mirror and (Path(mirror) / rel).is_file() else "missing"
            continue
        if _verified.get(path) == st.st_mtime:
            out[rel] = "verified"
        else:
            out[rel] = "present" if st.st_size == entry["size"] else "wrong size"
    return out


def unusable_assets(report: Dict[str, str]) -> List[str]:
    """The assets of an ``asset_report`` that a run cannot use until Fetch Assets (missing, wrong size)."""
    return sorted(rel for rel, state in report.items() if state in ("missing", "wrong size"))


def cache_bytes() -> int:
    """The size of the asset cache folder (derived arrays included)."""
    total = 0
    for root, _, files in os.walk(cache_dir()):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
