"""The bundle's array files: reproducible deflated .npz out, only plain numeric arrays in."""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.arrays import case_arrays, npz_bytes, read_npz, split_cases, write_npz
from agent.errors import HealthCheckError

ARRAYS = {
    "x": np.arange(64 * 8, dtype=np.float32).reshape(8, 64) % 7,
    "ids": np.array([[3, -1]], dtype=">i8"),  # another byte order survives
    "mask": np.asfortranarray(np.eye(3, dtype=bool)),
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 4), np.float16),
}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


def _zip(*members: tuple[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    # zipfile warns about a duplicate name; one bad file in the table has one on purpose.
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression=compression) as zf:
        warnings.simplefilter("ignore", UserWarning)
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _lying_header() -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    return _zip(("x.npy", header.getvalue() + bytes(8)))


def _flipped_byte() -> bytes:
    data = bytearray(npz_bytes({"x": np.arange(1000, dtype=np.float32)}))
    data[60] ^= 0xFF  # inside the first member's deflated data
    return bytes(data)


def test_same_arrays_give_the_same_bytes_whatever_their_order() -> None:
    assert npz_bytes(ARRAYS) == npz_bytes(dict(reversed(ARRAYS.items())))


def test_members_are_sorted_deflated_and_carry_no_time_or_host() -> None:
    with zipfile.ZipFile(io.BytesIO(npz_bytes(ARRAYS))) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == [f"{n}.npy" for n in sorted(ARRAYS)]
    for i in infos:
        assert i.compress_type == zipfile.ZIP_DEFLATED
        assert i.date_time == (1980, 1, 1, 0, 0, 0)
        assert (i.create_system, i.external_attr >> 16) == (3, 0o644)
        assert i.comment == b""
        assert i.extra == b""


def test_arrays_read_back_with_their_dtype_shape_and_values() -> None:
    got = read_npz(npz_bytes(ARRAYS), "golden.npz")
    assert set(got) == set(ARRAYS)
    for name, want in ARRAYS.items():
        assert got[name].dtype == want.dtype
        assert got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)
        assert got[name].flags.writeable


def test_redundant_golden_data_compresses_many_times() -> None:
    # Images upsampled from a coarse grid, like the conv example's golden inputs.
    coarse = np.random.default_rng(0).random((4, 3, 28, 28), dtype=np.float32)
    images = coarse.repeat(8, axis=2).repeat(8, axis=3)
    assert len(npz_bytes({"x": images})) * 20 < images.nbytes


def test_numpy_reads_what_is_written(tmp_path: Path) -> None:
    write_npz(tmp_path / "a.npz", ARRAYS)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["x"], ARRAYS["x"])


@pytest.mark.parametrize(
    "write", [np.savez, np.savez_compressed], ids=["stored (older bundles)", "numpy deflated"]
)
def test_stored_and_other_writers_files_are_read(write: Callable[..., None]) -> None:
    buf = io.BytesIO()
    write(buf, **ARRAYS)
    got = read_npz(buf.getvalue(), "old.npz")
    np.testing.assert_array_equal(got["x"], ARRAYS["x"])
    assert got["ids"].dtype == np.dtype(">i8")


def test_files_are_read_from_a_path(tmp_path: Path) -> None:
    write_npz(tmp_path / "a.npz", ARRAYS)
    np.testing.assert_array_equal(read_npz(tmp_path / "a.npz", "a.npz")["x"], ARRAYS["x"])


BAD_FILES: list[tuple[str, Callable[[], bytes], str]] = [
    ("not a zip", lambda: b"plainly not a zip file", "not a zip file"),
    ("pickled object array", lambda: _zip(("x.npy", _npy(np.array([{}], object)))), "never"),
    ("strings", lambda: _zip(("x.npy", _npy(np.array(["a", "b"])))), "only numbers"),
    ("not an .npy member", lambda: _zip(("x.txt", b"hello")), "not a single .npy"),
    (
        "twice the same member",
        lambda: _zip(("x.npy", _npy(np.zeros(2))), ("x.npy", _npy(np.ones(2)))),
        "not a single .npy",
    ),
    (
        "bzip2 member",
        lambda: _zip(("x.npy", _npy(np.zeros(2))), compression=zipfile.ZIP_BZIP2),
        "stored or deflated",
    ),
    ("header promising a terabyte", _lying_header, "claims 4000000000000 bytes"),
    ("data shorter than its shape", lambda: _zip(("x.npy", _npy(np.zeros(4))[:-8])), "exactly"),
    ("data longer than its shape", lambda: _zip(("x.npy", _npy(np.zeros(4)) + b"!")), "exactly"),
    ("flipped byte in deflated data", _flipped_byte, "cannot read"),
    ("not an .npy at all", lambda: _zip(("x.npy", b"\x93NUMPY but no")), "cannot read"),
]


@pytest.mark.parametrize(
    ("data", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_array_files_are_refused_naming_the_file(
    data: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(HealthCheckError, match=message) as err:
        read_npz(data(), "health/golden_inputs.npz")
    assert "health/golden_inputs.npz" in str(err.value)


def test_declared_sizes_over_the_limit_are_refused_before_inflating() -> None:
    # 64 MiB of zeros deflate to about 64 KiB: a bomb the limit catches from the
    # central directory alone.
    bomb = _zip(("x.npy", _npy(np.zeros(8 * 1024**2))))
    assert len(bomb) < 200_000
    with pytest.raises(HealthCheckError, match="over the limit of 1048576"):
        read_npz(bomb, "expected.npz", max_bytes=1024**2)


def test_the_limit_counts_all_members_together() -> None:
    data = npz_bytes({"a": np.zeros(100_000, np.uint8), "b": np.zeros(100_000, np.uint8)})
    assert set(read_npz(data, "f.npz", max_bytes=250_000)) == {"a", "b"}
    with pytest.raises(HealthCheckError, match=r"member 'b\.npy'"):
        read_npz(data, "f.npz", max_bytes=150_000)


def test_a_missing_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(HealthCheckError, match=r"cannot read absent\.npz"):
        read_npz(tmp_path / "absent.npz", "absent.npz")


def test_a_zip_of_a_version_zipfile_does_not_support_is_refused() -> None:
    data = bytearray(npz_bytes({"x": np.zeros(4, np.float32)}))
    end = data.rfind(b"PK\x01\x02")  # the central directory entry: "version needed" at +6
    data[end + 6] = 80  # version 8.0
    with pytest.raises(HealthCheckError, match="zip file version"):
        read_npz(bytes(data), "cases.npz")


# --- golden cases: "<case>/<name>" keys (schema 1.2) -----------------------------------


def test_cases_split_back_into_the_requests_they_were_made_of() -> None:
    cases = [{"x": np.zeros((1, 2)), "a/b": np.array(3)}, {"x": np.ones((1, 2))}]
    back = split_cases(read_npz(npz_bytes(case_arrays(cases)), "c.npz"), 2, "c.npz")
    assert [sorted(c) for c in back] == [["a/b", "x"], ["x"]]
    np.testing.assert_array_equal(back[1]["x"], cases[1]["x"])


@pytest.mark.parametrize(
    ("key", "count", "match"),
    [
        ("x", 1, "is not <case>/<name>"),
        ("0/", 1, "is not <case>/<name>"),
        ("01/x", 2, "is not <case>/<name>"),
        ("-1/x", 1, "is not <case>/<name>"),
        ("2/x", 2, "case 2 is beyond the 2"),
    ],
)
def test_case_keys_that_are_not_case_slash_name_fail_the_gate(
    key: str, count: int, match: str
) -> None:
    arrays = {f"{i}/x": np.zeros(1) for i in range(count)} | {key: np.zeros(1)}
    with pytest.raises(HealthCheckError, match=match):
        split_cases(arrays, count, "c.npz")


def test_a_case_the_manifest_lists_but_the_file_lacks_fails_the_gate() -> None:
    with pytest.raises(HealthCheckError, match="case 1 holds no arrays"):
        split_cases({"0/x": np.zeros(1)}, 2, "c.npz")
