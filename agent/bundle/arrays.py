"""The bundle's array files (golden inputs, expected outputs): ``.npz``, written reproducibly
and read safely. The encoding is fixed in docs/bundle-format.md, "Health files".

Writing: one ``NAME.npy`` member per array (the ``.npy`` format, never pickled), in name
order, deflated at a fixed level, with a fixed date, Unix attributes 0644 and no comment,
so the same arrays always give the same bytes (numpy's own writer stamps the current time
into the zip and compresses only on request).

Reading: stored (uncompressed) members, as bundles written before compression hold, and
deflated ones. Nothing is ever unpickled: only bool, integer, float and complex arrays
are accepted. Memory is bounded: every member's declared uncompressed size is checked
against a limit before anything is inflated, and inflating stops at the declared size,
so a small file cannot claim or grow into gigabytes (a decompression bomb).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import HealthCheckError

__all__ = [
    "COMPRESS_LEVEL",
    "MAX_ARRAY_BYTES",
    "case_arrays",
    "npz_bytes",
    "read_npz",
    "split_cases",
    "write_npz",
]

COMPRESS_LEVEL = 9
# All members of one file together, uncompressed. Golden data is a few samples: 8 images
# of 224x224x3 float32 are 4.8 MB, so this leaves ample room and still fits a small device.
MAX_ARRAY_BYTES = 256 * 1024**2
_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold
_UNIX = 3  # the "made by" system; the default depends on the platform that writes
_SUFFIX = ".npy"
_CASE_RE = re.compile(r"0|[1-9][0-9]{0,5}")  # ASCII digits, no leading zeros
_CHUNK = 1024**2
_KINDS = "biufc"  # numpy dtype kinds of numbers: never objects, strings or records
_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """``arrays`` as a deflated ``.npz``: the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.asarray(arrays[name], order="C"), allow_pickle=False
            )
            info = zipfile.ZipInfo(f"{name}{_SUFFIX}", date_time=_DATE)
            info.create_system = _UNIX
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=COMPRESS_LEVEL)
    return buf.getvalue()


def case_arrays(cases: Sequence[Mapping[str, npt.NDArray[Any]]]) -> dict[str, npt.NDArray[Any]]:
    """Golden cases as one mapping keyed ``"<case>/<name>"`` (docs/bundle-format.md)."""
    return {f"{i}/{name}": array for i, case in enumerate(cases) for name, array in case.items()}


def split_cases(
    arrays: Mapping[str, npt.NDArray[Any]], count: int, name: str
) -> list[dict[str, npt.NDArray[Any]]]:
    """The ``count`` cases of a file keyed ``"<case>/<name>"``: the inverse of
    :func:`case_arrays`. Pure.

    Raises:
        HealthCheckError: a key is not ``<case>/<name>`` with a case in ``[0, count)``,
            or a case holds no arrays.
    """
    cases: list[dict[str, npt.NDArray[Any]]] = [{} for _ in range(count)]
    for key, array in arrays.items():
        case, sep, tensor = key.partition("/")
        if not sep or not tensor or not _CASE_RE.fullmatch(case):
            raise HealthCheckError(f"{name}: {key!r} is not <case>/<name>; rebuild the bundle")
        if int(case) >= count:
            raise HealthCheckError(f"{name}: case {case} is beyond the {count} the manifest lists")
        cases[int(case)][tensor] = array
    empty = [i for i, c in enumerate(cases) if not c]
    if empty:
        raise HealthCheckError(f"{name}: case {empty[0]} holds no arrays; rebuild the bundle")
    return cases


def write_npz(path: Path, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Write :func:`npz_bytes` of ``arrays`` to ``path`` (a build's staging file).

    Raises:
        OSError: the file cannot be written.
    """
    Path(path).write_bytes(npz_bytes(arrays))


def read_npz(
    source: bytes | Path, name: str, *, max_bytes: int = MAX_ARRAY_BYTES
) -> dict[str, npt.NDArray[Any]]:
    """The arrays of an ``.npz`` file (its content, or its path), keyed by member name.

    ``name`` names the file in messages. At most ``max_bytes`` are inflated, all members
    together.

    Raises:
        HealthCheckError: the file cannot be read, is not a zip of ``.npy`` members stored
            or deflated, declares more than ``max_bytes``, holds anything but numeric
            arrays, or its content does not match its headers or checksums.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            members = zf.infolist()
            _check_members(members, name, max_bytes)
            return {m.filename[: -len(_SUFFIX)]: _read_member(zf, m, name) for m in members}
    except (
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        # numpy raises ValueError for a malformed header; zipfile raises BadZipFile for a
        # bad checksum, EOFError or zlib.error for a truncated or corrupt deflate stream,
        # NotImplementedError for a zip version it does not support (found by fuzzing).
        raise HealthCheckError(f"cannot read {name}: {exc}") from None


def _check_members(members: list[zipfile.ZipInfo], name: str, max_bytes: int) -> None:
    """Refuse, before inflating anything, what the reader does not handle or cannot afford."""
    seen: set[str] = set()
    declared = 0
    for m in members:
        where = f"cannot read {name}: member {m.filename!r}"
        if not m.filename.endswith(_SUFFIX) or m.filename in seen:
            raise HealthCheckError(f"{where} is not a single .npy array; rebuild the bundle")
        seen.add(m.filename)
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or m.flag_bits & 1:
            raise HealthCheckError(
                f"{where} is encrypted or compressed other than stored or deflated;"
                " rebuild the bundle with edgeship build"
            )
        declared += m.file_size
        if declared > max_bytes:
            raise HealthCheckError(
                f"{where} brings the file to {declared} bytes uncompressed, over the limit of"
                f" {max_bytes}; rebuild the bundle with fewer golden samples"
            )


def _read_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> npt.NDArray[Any]:
    where = f"cannot read {name}: member {member.filename!r}"
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADERS:
            raise HealthCheckError(f"{where} uses .npy format {version}; expected 1.0 or 2.0")
        shape, fortran_order, dtype = _HEADERS[version](f)
        if dtype.hasobject or dtype.kind not in _KINDS:
            raise HealthCheckError(
                f"{where} holds {dtype} values; only numbers are accepted (never pickles)"
            )
        size = math.prod(shape) * dtype.itemsize
        # The header may promise anything: never allocate more than the member declares.
        if size > member.file_size:
            raise HealthCheckError(
                f"{where} claims {size} bytes of data in {member.file_size}; the file is corrupt"
            )
        data = bytearray(size)
        done = 0
        while done < size:
            chunk = f.read(min(size - done, _CHUNK))
            if not chunk:
                break
            data[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != size or f.read(1):  # the last read also checks the member's CRC
            raise HealthCheckError(f"{where} does not hold exactly its header's shape")
    return np.ndarray(shape, dtype, buffer=data, order="F" if fortran_order else "C")
