"""Data set loading, binding, batching and the content digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ConfigError
from sdk.build.datasets import LABELS_KEY, UNNAMED_INPUT, Dataset, load_dataset


def _arrays(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 4)).astype(np.float32),
        rng.standard_normal((n, 2, 3)).astype(np.float32),
        rng.integers(0, 3, n),
    )


def test_npz_loads_inputs_by_name_and_labels_key(tmp_path: Path) -> None:
    a, b, y = _arrays()
    np.savez(tmp_path / "d.npz", a=a, b=b, labels=y)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.input_names == ("a", "b")
    np.testing.assert_array_equal(ds.inputs["b"], b)
    assert ds.labels is not None
    np.testing.assert_array_equal(ds.labels, y)
    assert len(ds) == 10


def test_npy_is_unnamed_until_bound_to_the_single_model_input(tmp_path: Path) -> None:
    a, _, y = _arrays()
    np.save(tmp_path / "x.npy", a)
    np.save(tmp_path / "y.npy", y)
    ds = load_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert ds.input_names == (UNNAMED_INPUT,)
    bound = load_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy", input_names=["pixels"])
    assert bound.input_names == ("pixels",)
    assert bound.labels is not None
    np.testing.assert_array_equal(bound.labels, y)


def test_folder_concatenates_files_sorted_by_name(tmp_path: Path) -> None:
    a, b, y = _arrays(12)
    # Written out of order: the name, not creation order, fixes the sample order.
    np.savez(tmp_path / "part2.npz", a=a[8:], b=b[8:], labels=y[8:])
    np.savez(tmp_path / "part0.npz", a=a[:5], b=b[:5], labels=y[:5])
    np.savez(tmp_path / "part1.npz", a=a[5:8], b=b[5:8], labels=y[5:8])
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.inputs["a"], a)
    assert ds.labels is not None
    np.testing.assert_array_equal(ds.labels, y)


def test_digest_depends_on_arrays_not_on_file_layout(tmp_path: Path) -> None:
    a, b, y = _arrays(12)
    np.savez(tmp_path / "one.npz", a=a, b=b, labels=y)
    folder = tmp_path / "split"
    folder.mkdir()
    np.savez(folder / "0.npz", a=a[:6], b=b[:6], labels=y[:6].astype(np.int32))
    np.savez_compressed(folder / "1.npz", a=a[6:], b=b[6:], labels=y[6:].astype(np.int32))
    assert load_dataset(tmp_path / "one.npz").sha256 == load_dataset(folder).sha256


def test_digest_follows_the_documented_canonical_form() -> None:
    x = np.arange(6, dtype=">f4").reshape(3, 2)  # big-endian in memory: hashed little-endian
    y = np.array([0, 1, 2], dtype=np.int32)  # labels are hashed as int64
    h = hashlib.sha256(b"edgeship-dataset-v1\n")
    h.update(b"input:x\0<f4\x003,2\x0024\n" + x.astype("<f4").tobytes())
    h.update(b"labels\0<i8\x003\x0024\n" + y.astype("<i8").tobytes())
    assert Dataset({"x": x}, y).sha256 == h.hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        lambda x: x + np.float32(1e-7),  # one value
        lambda x: x.astype(np.float64),  # dtype
        lambda x: x.reshape(3, 2, 1),  # shape
    ],
)
def test_digest_changes_with_values_dtype_or_shape(change: object) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    base = Dataset({"x": x})
    assert callable(change)
    assert Dataset({"x": change(x)}).sha256 != base.sha256


def test_digest_changes_with_input_name_and_labels() -> None:
    x = np.ones((3, 2), np.float32)
    assert Dataset({"x": x}).sha256 != Dataset({"y": x}).sha256
    assert Dataset({"x": x}).sha256 != Dataset({"x": x}, np.array([0, 0, 1])).sha256


def test_batches_cover_every_sample_once_in_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    batches = list(Dataset({"x": x}).batches(4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="cannot read"):
        load_dataset(tmp_path / "obj.npy")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"d.npz": {"a": np.ones((3, 2)), "b": np.ones((4, 2))}}, "sample count"),
        ({"d.npz": {"a": np.ones((3, 2)), LABELS_KEY: np.array([0.5, 1, 2])}}, "integer"),
        ({"d.npz": {"a": np.array(1.0)}}, "sample axis"),
        ({"0.npz": {"a": np.ones((3, 2))}, "1.npz": {"b": np.ones((3, 2))}}, "same arrays"),
        ({"0.npz": {"a": np.ones((3, 2))}, "1.npz": {"a": np.ones((3, 5))}}, "concatenated"),
    ],
)
def test_inconsistent_data_sets_are_config_errors(
    tmp_path: Path, files: dict[str, dict[str, np.ndarray]], message: str
) -> None:
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)  # type: ignore[arg-type]
    target = tmp_path if len(files) > 1 else tmp_path / next(iter(files))
    with pytest.raises(ConfigError, match=message):
        load_dataset(target)


def test_missing_path_and_wrong_suffix_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"\.npy or \.npz"):
        load_dataset(tmp_path / "data.csv")


def test_binding_to_other_input_names_is_a_config_error() -> None:
    ds = Dataset({"a": np.ones((2, 2)), "b": np.ones((2, 2))})
    with pytest.raises(ConfigError, match="expects"):
        ds.bind(["x"])
