"""The drift reference: agrees with agent.bundle.drift's features and stays small."""

from __future__ import annotations

import numpy as np
import pytest

from agent.bundle.drift import MAX_DRIFT_FEATURES
from agent.bundle.manifest import Manifest
from agent.errors import ConfigError
from sdk.build.datasets import Dataset
from sdk.build.drift_reference import drift_reference
from tests.support.bundles import make_manifest


def test_narrow_input_gets_one_feature_per_element_with_its_statistics() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2000, 4))
    ref = drift_reference(Dataset({"x": x}), bins=10)
    assert ref.groups == {"x": 4}
    assert ref.sample_count == 2000
    f = ref.features[0]
    assert f.mean == pytest.approx(x[:, 0].mean(), rel=1e-5)
    assert f.std == pytest.approx(x[:, 0].std(), rel=1e-5)
    assert len(f.edges) == 9
    assert f.edges == tuple(sorted(f.edges))
    assert sum(f.fractions) == pytest.approx(1.0, abs=1e-5)
    # Deciles: each bin holds about a tenth of the samples.
    assert max(f.fractions) < 0.12


def test_wide_input_is_summarised_to_a_bounded_size() -> None:
    x = np.random.default_rng(1).random((50, 3, 64, 64), dtype=np.float32)
    ref = drift_reference(Dataset({"img": x, "meta": x[:, 0, 0, :8]}))
    assert ref.groups["img"] <= MAX_DRIFT_FEATURES
    assert ref.groups["meta"] == 8
    assert len(ref.features) == ref.groups["img"] + 8


def test_many_inputs_share_the_total_feature_budget() -> None:
    inputs = {f"in{i:02d}": np.random.default_rng(i).random((20, 100)) for i in range(40)}
    ref = drift_reference(Dataset(inputs), max_total_features=256)
    assert len(ref.features) <= 256
    assert set(ref.groups) == set(inputs)


def test_fractions_follow_the_manifest_bin_convention() -> None:
    # Values exactly on an edge belong to the bin that edge closes: (e_{i-1}, e_i].
    x = np.repeat(np.arange(10, dtype=np.float64), 10).reshape(100, 1)
    ref = drift_reference(Dataset({"x": x}), bins=10)
    f = ref.features[0]
    counts = np.zeros(len(f.edges) + 1)
    for v in x[:, 0]:
        counts[int(np.searchsorted(f.edges, v, side="left"))] += 1
    np.testing.assert_allclose(f.fractions, counts / 100)


def test_constant_feature_gets_a_single_edge_and_all_mass_in_one_bin() -> None:
    ref = drift_reference(Dataset({"x": np.full((30, 1), 2.5)}))
    f = ref.features[0]
    assert f.edges == (2.5,)
    assert f.fractions == (1.0, 0.0)
    assert f.std == 0.0


def test_reference_survives_a_manifest_round_trip() -> None:
    ref = drift_reference(Dataset({"x": np.random.default_rng(2).random((40, 300))}))
    manifest = make_manifest(drift_reference=ref)
    assert Manifest.from_bytes(manifest.to_bytes()).drift_reference == ref


def test_non_finite_values_are_refused() -> None:
    x = np.ones((5, 2))
    x[3, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        drift_reference(Dataset({"x": x}))
