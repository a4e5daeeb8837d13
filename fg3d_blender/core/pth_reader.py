"""PyTorch weight files (``.pt``/``.pth``) read as numpy arrays, without torch.

The inference path runs on onnxruntime and never imports torch; it still reads the weights from the
files torch wrote: 3DDFA_V2's ``mb05_120x120.pth`` (torch's legacy format, before 1.6) and our own FGNet
``.pt`` (the zip format).  The pickle inside is read by a restricted unpickler that admits only
``OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the typed storage classes, each mapped to a
harmless stand-in: no code of the file runs, and a file that needs anything else is refused with one line,
as ``checkpoint.read_checkpoint`` (torch's ``weights_only=True`` load, for training) refuses it.
Storages become numpy arrays of the storage's dtype, read from ``<archive>/data/<key>`` (zip) or from the
records after the pickles (legacy); each tensor is its storage viewed through its offset, size and stride,
bounds-checked, and copied out contiguous.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Dict, Union

import numpy as np

from .errors import FG3DError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for ``torch.<X>Storage``: only its dtype is used."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, int(numel)
        self.data: np.ndarray = None  # filled once the file's storages are read


class _Tensor:
    """What ``_rebuild_tensor_v2`` returns here: a view to resolve once the storages are read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if len(self.size) != len(self.stride) or any(s < 0 for s in self.size + self.stride):
            raise ValueError("bad tensor geometry")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if data is None or (all(self.size) and (self.offset < 0 or last >= len(data))):
            raise ValueError("tensor outside its storage")
        if not all(self.size):
            return np.zeros(self.size, data.dtype if data is not None else np.float32)
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=[s * item for s in self.stride], writeable=False
        )
        return np.array(view, order="C")  # a copy, contiguous (0-d stays 0-d)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _Tensor(storage, storage_offset, size, stride)


class _WeightsUnpickler(pickle.Unpickler):
    """Admits torch's tensor records and plain containers, nothing else (no code can run)."""

    def __init__(self, file, storages: Dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"unsupported global: {module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:40]}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, _StorageType):
            raise pickle.UnpicklingError("unsupported storage type")
        if len(pid) > 5 and pid[5] is not None:  # a view into another storage (torch < 0.4 files)
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self._storages:
            self._storages[key] = _Storage(kind.dtype, key, numel)
        return self._storages[key]


def _resolve(obj: Any) -> Any:
    """The unpickled object with every tensor record replaced by its numpy array."""
    if isinstance(obj, _Tensor):
        return obj.array()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _read_zip(file: str) -> Any:
    with zipfile.ZipFile(file) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ValueError("no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() != b"little":
            raise ValueError("big-endian file")
        storages: Dict[str, _Storage] = {}
        with z.open(pkl) as f:
            obj = _WeightsUnpickler(f, storages).load()
        for s in storages.values():
            raw = z.read(f"{prefix}data/{s.key}")
            if len(raw) < s.numel * s.dtype.itemsize:
                raise ValueError("short storage")
            s.data = np.frombuffer(raw, s.dtype, count=s.numel)
    return obj


def _read_legacy(f: BinaryIO) -> Any:
    storages: Dict[str, _Storage] = {}
    if _WeightsUnpickler(f, storages).load() != LEGACY_MAGIC:
        raise ValueError("not a torch file")
    if _WeightsUnpickler(f, storages).load() != LEGACY_PROTOCOL:
        raise ValueError("unknown torch file protocol")
    info = _WeightsUnpickler(f, storages).load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise ValueError("big-endian file")
    obj = _WeightsUnpickler(f, storages).load()
    keys = _WeightsUnpickler(f, storages).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise ValueError("storage list does not match")
    for key in map(str, keys):  # each record: int64 element count, then the raw elements
        s = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        raw = f.read(numel * s.dtype.itemsize)
        if numel != s.numel or len(raw) != numel * s.dtype.itemsize:
            raise ValueError("short storage")
        s.data = np.frombuffer(raw, s.dtype)
    return obj


def refused(path, what: str) -> FG3DError:
    return FG3DError(
        f"{path}: refused as {what}: it holds Python objects besides tensors, and loading those could run "
        "code; only plain weight files are read"
    )


def damaged(path, what: str, exc: BaseException = None) -> FG3DError:
    why = f": {type(exc).__name__}" if exc is not None else ""
    return FG3DError(f"{path}: not a PyTorch {what} (damaged or another kind of file{why})")


def read_weights(path: Union[str, os.PathLike], what: str = "weights file") -> dict:
    """The dict a ``.pt``/``.pth`` file holds, tensors as numpy arrays (their stored dtype).

    One line (``FG3DError``) naming the file and ``what`` it was meant to be when it is missing, a folder,
    damaged, another kind of file, or holds anything but tensors and plain containers."""
    file = os.fspath(path)
    try:
        if zipfile.is_zipfile(file):
            obj = _read_zip(file)
        else:
            with open(file, "rb") as f:
                obj = _read_legacy(f)
        obj = _resolve(obj)
    except FileNotFoundError:
        raise FG3DError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise FG3DError(f"{path}: is a folder, not a {what}") from None
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise refused(path, what) from None
        raise damaged(path, what) from None
    except Exception as exc:  # noqa: BLE001 - zip, EOF, struct, OS errors…: all mean "not a weights file"
        raise damaged(path, what, exc) from None
    if not isinstance(obj, dict):
        raise FG3DError(f"{path}: not a {what} (it holds a {type(obj).__name__}, not a dict of weights)")
    return obj


def strip_module_prefix(state: dict) -> dict:
    """Keys of a DataParallel checkpoint (``module.x``) → plain keys (``x``)."""
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def state_arrays(ck: dict, path, what: str) -> Dict[str, np.ndarray]:
    """A checkpoint's ``state_dict`` (or the dict itself) as float32 arrays, ``module.`` prefixes removed,
    BatchNorm's step counters left out (inference does not use them)."""
    state = ck.get("state_dict", ck)
    if not isinstance(state, dict) or not state or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise FG3DError(f"{path}: does not hold {what} weights (no state_dict of tensors)")
    return {
        k: np.ascontiguousarray(v, dtype=np.float32)
        for k, v in strip_module_prefix(state).items()
        if not k.endswith("num_batches_tracked")
    }
