"""Hostile runs of the command line and the Python API: taken output names, kills, full disks, long names,
modes, unwritable folders, bad arguments, broken caches and bad training files.

Each case ends in a correct result, or in one ``fg3d: error:`` line with nothing left behind; a batch
goes on with its next photo.  The photos are the real ones in ../shared, the disks are real (a small
tmpfs where this machine lets us mount one, else a file-size limit, which fails writes the same way).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, check_one_error_line

from fg3d_blender.core import assets
from fg3d_blender.core.atomic import AtomicWriter, remove_stale, temp_file
from fg3d_blender.core.errors import FG3DError

PHOTO_NAME = "02463d453_-2_-3.jpg"  # a small frontal photo: each reconstruction is quick


@pytest.fixture(scope="module")
def photo(photos_dir) -> Path:
    return photos_dir / "fg3d_examples" / PHOTO_NAME


def _cli(cli_env, *args, umask=None, fsize=None, **kw):
    def limits():
        if umask is not None:
            os.umask(umask)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "fg3d_blender", *map(str, args)],
        cwd=REPO,
        env=dict(cli_env, **kw.pop("env", {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits,
        **kw,
    )


def _run(cli_env, *args, timeout=300, **kw):
    p = _cli(cli_env, *args, **kw)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _parts(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")] if folder.exists() else []


# ---- the atomic writer ----------------------------------------------------------------------------


def test_temporaries_are_short_and_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        t = temp_file(tmp_path)
    finally:
        os.umask(old)
    assert len(t.name) <= 30 and t.name.startswith(".fg3d-") and t.name.endswith(".part")
    assert stat.S_IMODE(t.stat().st_mode) == 0o640


def test_a_taken_name_is_found_before_any_file_is_renamed(tmp_path):
    (tmp_path / "b.txt").mkdir()
    w = AtomicWriter(tmp_path)
    for name in ("a.txt", "b.txt", "c.txt"):
        Path(w.path(name)).write_text(name)
    with pytest.raises(FG3DError, match="b.txt: exists and is not a file"):
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]


class _Stop(BaseException):
    pass


def test_a_signal_at_any_moment_of_writing_leaves_no_temporary(tmp_path):
    """SIGTERM sent at random moments from another thread (as the kernel may deliver it) while the
    main thread creates temporaries and commits: the handler's exception never strands a file."""

    armed = [False]

    def stop(signum, frame):
        if armed[0]:  # one exception per writer; a signal during the cleanup that follows is dropped
            armed[0] = False
            raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    delays = np.random.default_rng(0).uniform(0, 4e-4, 400)

    def sender():
        for d in delays:
            time.sleep(float(d))
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=sender)
    stops = 0
    try:
        thread.start()
        while thread.is_alive():
            w = AtomicWriter(tmp_path)
            try:
                armed[0] = True
                for name in ("a.obj", "a.glb", "a.png"):
                    w.path(name)
                w.commit()
                armed[0] = False
            except _Stop:
                stops += 1
                w.abort()
        thread.join()
        time.sleep(0.02)  # a last signal still on its way
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stops > 100 and _parts(tmp_path) == [], (stops, _parts(tmp_path))


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".fg3d-{pid}-0123abcd.part"
    stale.write_text("left by a killed run")
    mine = temp_file(tmp_path)
    other = tmp_path / ".fg3d-1-0123abcd.part"  # pid 1 always runs
    other.write_text("a live process is writing this")
    keep = tmp_path / ".fg3d-notes.part"  # not our pattern: never touched
    keep.write_text("x")
    assert remove_stale(tmp_path) == 1
    assert not stale.exists() and mine.exists() and other.exists() and keep.exists()


# ---- the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_folder_taking_an_output_name_fails_that_photo_only(tmp_path, photo, cli_env):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("test.jpg", "other.jpg"):
        shutil.copyfile(photo, src / name)
    out = tmp_path / "out"
    (out / "test.glb").mkdir(parents=True)
    proc = _run(cli_env, "reconstruct", src, "-o", out, "-q", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fg3d: error:")]
    assert len(errors) == 1 and "test.glb: exists and is not a file" in errors[0], proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("test")] == ["test.glb"]  # nothing else of "test"
    assert "other.obj" in names and "other.glb" in names and not _parts(out)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["failed"]) == (1, 1)


@pytest.fixture
def one_photo(tmp_path, photo) -> Path:
    """A folder holding the test photo as ``a.jpg``."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(photo, src / "a.jpg")
    return src


def _kill_while_writing(cli_env, src: Path, out: Path, sig: int):
    """Start a batch, wait for the first temporary file of the outputs, then send ``sig``."""
    p = _cli(cli_env, "reconstruct", src, "-o", out, "-q", "--format", "obj,glb,ply,npz")
    deadline = time.monotonic() + 240
    while not _parts(out) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert _parts(out), "the run never wrote"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


@pytest.mark.slow
def test_sigterm_while_writing_leaves_nothing_half_written(tmp_path, one_photo, cli_env):
    src, out = one_photo, tmp_path / "out"
    code, err = _kill_while_writing(cli_env, src, out, signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1] == "fg3d: error: terminated", err
    assert "Traceback" not in err
    assert not list(out.iterdir())  # the photo's outputs appear all together or not at all


@pytest.mark.slow
def test_sigkill_leftovers_are_ignored_and_removed_by_the_next_run(tmp_path, one_photo, cli_env):
    src, out = one_photo, tmp_path / "out"
    code, _ = _kill_while_writing(cli_env, src, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = _parts(out)
    assert left and all(n.startswith(".fg3d-") for n in left)
    # the folder as input: the leftovers are not photos; the next run writing there removes them
    proc = _run(cli_env, "reconstruct", out, "-o", out, "--no-extras")
    assert "no photos" in proc.stderr
    proc = _run(cli_env, "reconstruct", src / "a.jpg", "-o", out, "--format", "ply", "--no-extras")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.ply"]


@pytest.mark.slow
def test_names_up_to_the_limit_work_and_longer_stems_are_cut(tmp_path, photo, cli_env):
    src = tmp_path / "in"
    src.mkdir()
    for n in (240, 251):  # the photo's name fits; its outputs' names (+ "_texture.png") would not
        shutil.copyfile(photo, src / ("é" * (n // 2) + "x" * (n % 2) + ".jpg"))
    out = tmp_path / "out"
    proc = _run(cli_env, "reconstruct", src, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    names = [p.name for p in out.iterdir()]
    assert len(names) == 2 * 7 and max(len(os.fsencode(n)) for n in names) <= 255
    assert not _parts(out)


@pytest.mark.slow
def test_outputs_and_cache_files_get_the_umask_mode(tmp_path, photo, cli_env, shared_dir):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    env = {"FG3D_CACHE_DIR": str(cache), "FG3D_ASSET_MIRROR": str(shared_dir / "models")}
    proc = _run(cli_env, "fetch-assets", umask=0o002, env=env)
    assert proc.returncode == 0, proc.stderr
    # fetch-assets also prepares dlib's detector and landmark arrays, so the first photo need not
    assert len(list(cache.glob("derived/shape_predictor_68_face_landmarks.*.npy"))) == 6
    assert len(list(cache.glob("derived/frontal_face_detector.*.svm"))) == 1
    modes = {stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*") if p.is_file()}
    assert modes == {0o664}, modes
    proc = _run(cli_env, "reconstruct", photo, "-o", out, "--format", "obj,npz", umask=0o022)
    assert proc.returncode == 0, proc.stderr
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {0o644}, modes


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1 MB file system (tmpfs, as root), or None where mounting is not allowed (then the
    tests limit the file size instead, which fails the writes with EFBIG the same way)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        yield d, 1 << 20
        return
    try:
        yield d, None
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "obj,glb"])
def test_a_full_disk_gives_one_line_and_leaves_nothing(small_disk, photo, cli_env, fmt):
    disk, fsize = small_disk
    out = disk / "out"
    proc = _run(cli_env, "reconstruct", photo, "-o", out, "--format", fmt, "--no-extras", fsize=fsize)
    assert proc.returncode == 1
    check_one_error_line(proc, out, "could not write the outputs")


@pytest.mark.slow
def test_blend_on_a_full_disk_gives_one_line(small_disk, photo, cli_env):
    pytest.importorskip("bpy")
    disk, fsize = small_disk
    out = disk / "out"
    proc = _run(cli_env, "reconstruct", photo, "-o", out, "--format", "blend", "--no-extras", fsize=fsize)
    assert proc.returncode == 1, proc.stderr
    line = [s for s in proc.stderr.splitlines() if s.startswith("fg3d: error:")]
    assert len(line) == 1 and "internal error" not in line[0] and "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


@pytest.mark.slow
def test_an_unwritable_output_folder_fails_before_any_work(unwritable_dir, photo, cli_env):
    for out in (unwritable_dir, unwritable_dir / "new" / "deeper"):
        proc = _run(cli_env, "reconstruct", photo, "-o", out)
        assert proc.returncode == 1
        line = check_one_error_line(proc, unwritable_dir / "nothing", "cannot write there")
        assert str(out) in line
    assert not list(unwritable_dir.iterdir())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--texture-size", "0"], "0 is not one of 256, 512, 1024, 2048"),
        (["--texture-size", "-5"], "-5 is not one of"),
        (["--texture-size", "abc"], "'abc' is not a whole number"),
        (["--texture-size", "100000"], "100000 is not one of"),
        (["--face-index", "-1"], "-1 is outside 0…999"),
        (["--face-index", "x"], "'x' is not a whole number"),
        (["--threads", "-1"], "-1 is outside 0…256"),
        (["--threads", "two"], "'two' is not a whole number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line(args, needle, tmp_path, photo, cli_env):
    proc = _run(cli_env, "reconstruct", photo, "-o", tmp_path / "out", *args, timeout=60)
    assert proc.returncode == 2
    check_one_error_line(proc, tmp_path / "out", needle, "--help")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"texture_size": 0}, "texture size 0"),
        ({"texture_size": "1024"}, "texture size '1024'"),
        ({"texture_size": True}, "texture size True"),
        ({"face_index": -1}, "face index -1"),
        ({"face_index": 1.5}, "face index 1.5"),
        ({"face_index": "0"}, "face index '0'"),
        ({"passes": 0}, "passes 0"),
        ({"threads": -1}, "threads -1"),
        ({"threads": "2"}, "threads '2'"),
    ],
)
def test_the_python_api_validates_its_options(kwargs, needle, photo):
    from fg3d_blender.core.pipeline import reconstruct  # torch: only where a test reconstructs

    with pytest.raises(FG3DError, match=needle):
        reconstruct(photo, **kwargs)


# ---- caches -----------------------------------------------------------------------------------------


def test_derived_arrays_are_rebuilt_when_damaged_and_kept_in_memory_when_unwritable(tmp_path, monkeypatch):
    monkeypatch.setenv("FG3D_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5.0)}

    np.testing.assert_array_equal(assets.load_derived("x.npz", build)["a"], np.arange(5.0))
    np.testing.assert_array_equal(assets.load_derived("x.npz", build)["a"], np.arange(5.0))
    assert len(calls) == 1
    path = tmp_path / "cache" / "derived" / "x.npz"
    np.savez(path, a=np.zeros(3))  # tampered: a valid npz, other content
    assert assets.load_derived("x.npz", build)["a"].shape == (5,) and len(calls) == 2
    path.write_bytes(path.read_bytes()[:50])  # damaged
    assert assets.load_derived("x.npz", build)["a"].shape == (5,) and len(calls) == 3
    assert assets.load_derived("x.npz", build)["a"].shape == (5,) and len(calls) == 3
    # a cache path that cannot hold a folder: the arrays still come back
    monkeypatch.setenv("FG3D_CACHE_DIR", str(tmp_path / "cache" / "derived" / "x.npz" / "below"))
    assert assets.load_derived("y.npz", build)["a"].shape == (5,) and len(calls) == 4


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, photo):
    """A complete cache (assets and derived files) built by a real run, to copy and break."""
    from fg3d_blender.core.pipeline import reconstruct  # torch: only where a test reconstructs

    reconstruct(photo, refine=False, texture_size=256)
    return assets.cache_dir()


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eos", ".fg3d-*"))
    return dst


@pytest.mark.slow
def test_broken_caches_give_one_line_or_heal(tmp_path, photo, cli_env, warm_cache):
    out = tmp_path / "out"
    no_mirror = {"FG3D_ASSET_MIRROR": ""}
    # a cache path that is a file
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    proc = _run(cli_env, "reconstruct", photo, "-o", out, env=dict(no_mirror, FG3D_CACHE_DIR=str(blocker)))
    check_one_error_line(proc, out, "cache-file is a file, not a folder", "FG3D_CACHE_DIR")
    proc = _run(cli_env, "fetch-assets", env=dict(no_mirror, FG3D_CACHE_DIR=str(blocker)))
    check_one_error_line(proc, out, "is a file, not a folder")
    # tampered derived files are rebuilt (the pickled assets' arrays), and the run succeeds
    cache = _copy_cache(warm_cache, tmp_path / "tampered")
    derived = sorted((cache / "derived").glob("Model_PAF.*.npz"))
    assert derived
    np.savez(derived[0], junk=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    stats = sorted((cache / "derived").glob("param_mean_std*.npz"))[0]
    stats.write_bytes(b"PK\x03\x04 not a zip")
    proc = _run(
        cli_env, "reconstruct", photo, "-o", out, "--format", "ply", "--no-extras", "--no-refine",
        env=dict(no_mirror, FG3D_CACHE_DIR=str(cache)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(derived[0], allow_pickle=False) as z:
        assert "junk" not in z.files
    shutil.rmtree(out)


@pytest.mark.slow
def test_fetch_assets_with_a_missing_mirror_makes_nothing(tmp_path, cli_env):
    cache = tmp_path / "cache"
    env = {"FG3D_CACHE_DIR": str(cache), "FG3D_ASSET_MIRROR": str(tmp_path / "no-such-mirror")}
    proc = _run(cli_env, "fetch-assets", env=env)
    check_one_error_line(proc, tmp_path / "nothing", "no-such-mirror: no such folder")
    assert not cache.exists()


@pytest.mark.slow
def test_a_read_only_cache_still_reconstructs(tmp_path, photo, cli_env, warm_cache):
    """Assets present, derived files missing, nothing writable: the run computes them in memory."""
    cache = _copy_cache(warm_cache, tmp_path / "ro-cache")
    for p in (cache / "derived").glob("Model_PAF.*"):
        p.unlink()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"root cannot bind-mount read-only here: {r.stderr.decode().strip()}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
    else:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        with pytest.raises(OSError):
            (cache / "probe").write_text("x")
        out = tmp_path / "out"
        proc = _run(
            cli_env, "reconstruct", photo, "-o", out, "--format", "ply", "--no-extras", "--no-refine",
            env={"FG3D_CACHE_DIR": str(cache), "FG3D_ASSET_MIRROR": ""},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert (out / f"{photo.stem}.ply").is_file()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(cache)], check=False)


@pytest.mark.slow
def test_assets_are_verified_again_when_the_cache_folder_changes(tmp_path, photo, warm_cache, monkeypatch):
    """As the add-on does when its Asset cache folder preference changes: same process, new folder."""
    from fg3d_blender.core.pipeline import reconstruct  # torch: only where a test reconstructs

    good = _copy_cache(warm_cache, tmp_path / "good")
    bad = _copy_cache(warm_cache, tmp_path / "bad")
    w = bad / "3ddfa_v2" / "mb05_120x120.pth"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    monkeypatch.delenv("FG3D_ASSET_MIRROR", raising=False)
    monkeypatch.setenv("FG3D_CACHE_DIR", str(good))
    assert reconstruct(photo, refine=False, texture_size=256).vertices.shape == (53215, 3)
    monkeypatch.setenv("FG3D_CACHE_DIR", str(bad))
    with pytest.raises(FG3DError, match="mb05_120x120.pth .*corrupt"):
        reconstruct(photo, refine=False, texture_size=256)


# ---- training files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_photos(tmp_path_factory, shared_dir, photos_dir):
    d = tmp_path_factory.mktemp("train")
    (d / "utk").mkdir()
    for p in sorted((shared_dir / "training" / "utkface").iterdir())[:4]:
        shutil.copyfile(p, d / "utk" / p.name)
    (d / "other").mkdir()
    for p in sorted((photos_dir / "fg3d_examples").iterdir())[:3]:  # real faces, not 200×200
        shutil.copyfile(p, d / "other" / p.name)
    return d


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _train_args(photos: Path, out: Path, *more):
    return ["train-fgnet", "--photos", photos, "--out", out, "--steps", "1", "--batch", "2", "--width", "4",
            "--uv-size", "64", "--eval-every", "0", *more]  # fmt: skip


@pytest.mark.slow
def test_bad_weight_files_for_training_give_one_line(tmp_path, train_photos, cli_env):
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "hook": _Evil(marker)}, evil)
    npz = tmp_path / "arrays.pt"
    np.savez(npz.with_suffix(".npz"), a=np.zeros(2))
    npz.write_bytes(npz.with_suffix(".npz").read_bytes())
    for bad, needle in ((text, "not a PyTorch"), (evil, "could run code"), (npz, "not a PyTorch")):
        out = tmp_path / "w.pt"
        proc = _run(cli_env, *_train_args(train_photos / "utk", out, "--init", bad))
        assert proc.returncode == 1, proc.stderr
        errors = [s for s in proc.stderr.splitlines() if s.startswith("fg3d: error:")]
        assert len(errors) == 1 and needle in errors[0] and str(bad) in errors[0], proc.stderr
        assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    # a damaged checkpoint to resume from
    out = tmp_path / "r.pt"
    Path(f"{out}.ckpt").write_bytes(b"PK\x03\x04 damaged")
    proc = _run(cli_env, *_train_args(train_photos / "utk", out, "--resume"))
    errors = [s for s in proc.stderr.splitlines() if s.startswith("fg3d: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "r.pt.ckpt" in errors[0], proc.stderr
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_training_on_photos_of_the_wrong_size_says_why(tmp_path, train_photos, cli_env):
    proc = _run(cli_env, *_train_args(train_photos / "other", tmp_path / "w.pt"))
    assert proc.returncode == 1
    assert "3 were skipped as unreadable or not 200×200" in proc.stderr, proc.stderr
    errors = [s for s in proc.stderr.splitlines() if s.startswith("fg3d: error:")]
    assert len(errors) == 1 and "holds no faces" in errors[0] and "200×200" in errors[0]
    assert "Traceback" not in proc.stderr
