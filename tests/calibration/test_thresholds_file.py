"""The thresholds file format: round trip and validation errors that name file and field."""

from __future__ import annotations

import json
import math

import pytest

from cats_serve.calibration.thresholds_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CalibrationInfo,
    HeldoutInfo,
    ModelInfo,
    ThresholdsFile,
    ThresholdsFileError,
    load_thresholds,
    save_thresholds,
)

SIZES = dict(num_layers=3, hidden_size=8, intermediate_size=16)


def make_file(**overrides) -> ThresholdsFile:
    fields = dict(
        model=ModelInfo("tiny", 3, 8, 16, "sha256:0123456789abcdef"),
        target_sparsity=0.5,
        mode="allocated",
        mean_sparsity=0.5,
        layer_sparsity=[0.4, 0.5, 0.6],
        thresholds=[0.01, 0.02, 0.03],
        calibration=CalibrationInfo("builtin:lambada (calibration)", 10, 1000, 400, 0.01),
        heldout=HeldoutInfo("builtin:lambada (heldout)", 200, [0.41, 0.5, 0.62], 0.51),
    )
    fields.update(overrides)
    return ThresholdsFile(**fields)


def write(tmp_path, data) -> object:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return path


def test_round_trip(tmp_path):
    path = save_thresholds(make_file(extra={"kl": 0.1}), tmp_path / "a" / "t.json")
    loaded = load_thresholds(path, **SIZES, fingerprint="sha256:0123456789abcdef")
    assert loaded.thresholds == [0.01, 0.02, 0.03]
    assert loaded.target_sparsity == 0.5
    assert loaded.mode == "allocated"
    assert loaded.model_name == "tiny"
    assert loaded.path == path
    assert loaded.heldout.layer_sparsity == [0.41, 0.5, 0.62]
    assert loaded.extra == {"kl": 0.1}
    assert json.loads(path.read_text())["format"] == FORMAT_NAME


def test_up_rms_round_trip_one_layer_per_line(tmp_path):
    scale = [[0.5 + 0.01 * j + i for j in range(16)] for i in range(3)]
    path = save_thresholds(make_file(criterion="up_rms", neuron_scale=scale), tmp_path / "t.json")
    loaded = load_thresholds(path, **SIZES, fingerprint=None)
    assert loaded.criterion == "up_rms"
    assert loaded.neuron_scale == scale
    lines = path.read_text().splitlines()
    assert sum(line.lstrip().startswith("[0.5,") for line in lines) == 1  # layer 0, one line
    assert json.loads(path.read_text())["version"] == FORMAT_VERSION == 3


def test_two_threshold_round_trip(tmp_path):
    file = make_file(down_thresholds=[0.1, 0.2, 0.3], layer_up_sparsity=[0.3, 0.4, 0.5])
    loaded = load_thresholds(save_thresholds(file, tmp_path / "t.json"), **SIZES, fingerprint=None)
    assert loaded.two_threshold
    assert loaded.down_thresholds == [0.1, 0.2, 0.3]
    assert loaded.layer_up_sparsity == [0.3, 0.4, 0.5]
    assert loaded.threshold_pairs() == [[0.01, 0.02, 0.03], [0.1, 0.2, 0.3]]


def test_single_threshold_pairs_have_zero_down_thresholds(tmp_path):
    loaded = load_thresholds(save_thresholds(make_file(), tmp_path / "t.json"), **SIZES,
                             fingerprint=None)  # fmt: skip
    assert not loaded.two_threshold
    assert loaded.threshold_pairs() == [[0.01, 0.02, 0.03], [0.0, 0.0, 0.0]]


def test_version_2_files_load_as_single_threshold(tmp_path):
    data = make_file().to_json()
    data.update(version=2)
    del data["down_thresholds"], data["layer_up_sparsity"]
    loaded = load_thresholds(write(tmp_path, data), **SIZES, fingerprint=None)
    assert (loaded.down_thresholds, loaded.layer_up_sparsity) == (None, None)
    assert loaded.thresholds == [0.01, 0.02, 0.03]


def test_version_1_files_load_as_the_silu_criterion(tmp_path):
    data = make_file().to_json()
    data.update(version=1)
    del data["criterion"], data["neuron_scale"], data["down_thresholds"], data["layer_up_sparsity"]
    loaded = load_thresholds(write(tmp_path, data), **SIZES, fingerprint=None)
    assert (loaded.criterion, loaded.neuron_scale) == ("silu", None)
    assert loaded.thresholds == [0.01, 0.02, 0.03]


def test_fingerprint_none_skips_weight_check(tmp_path):
    path = save_thresholds(make_file(), tmp_path / "t.json")
    assert load_thresholds(path, **SIZES, fingerprint=None).model.fingerprint.startswith("sha")


def corrupt(tmp_path, edit):
    data = make_file().to_json()
    edit(data)
    return write(tmp_path, data)


@pytest.mark.parametrize(
    ("edit", "field", "found"),
    [
        (lambda d: d.update(format="other"), "format", "'other'"),
        (lambda d: d.update(version=4), "version", "4"),
        (lambda d: d.pop("down_thresholds"), "down_thresholds", "missing"),
        (lambda d: d.update(down_thresholds=[0.1, -1.0, 0.2]), "down_thresholds[1]", "-1.0"),
        (lambda d: d.update(down_thresholds=[0.1, 0.2]), "down_thresholds", "a list of 2"),
        (
            lambda d: d.update(down_thresholds=[0.1, 0.2, 0.3]),
            "layer_up_sparsity",
            "None",
        ),
        (
            lambda d: d.update(down_thresholds=[0.1] * 3, layer_up_sparsity=[0.2, 1.5, 0.1]),
            "layer_up_sparsity[1]",
            "1.5",
        ),
        (lambda d: d.update(criterion="wanda"), "criterion", "'wanda'"),
        (lambda d: d.pop("criterion"), "criterion", "missing"),
        (lambda d: d.update(neuron_scale=[[1.0] * 16] * 3), "neuron_scale", "[[1.0"),
        (lambda d: d.update(criterion="up_rms"), "neuron_scale", "None"),
        (
            lambda d: d.update(criterion="up_rms", neuron_scale=[[1.0] * 16] * 2),
            "neuron_scale",
            "a list of 2",
        ),
        (
            lambda d: d.update(criterion="up_rms", neuron_scale=[[1.0] * 16] * 2 + [[1.0] * 15]),
            "neuron_scale[2]",
            "a list of 15",
        ),
        (
            lambda d: d.update(
                criterion="up_rms", neuron_scale=[[1.0] * 16] * 2 + [[1.0] * 15 + [0.0]]
            ),
            "neuron_scale[2][15]",
            "0.0",
        ),
        (
            lambda d: d.update(
                criterion="up_rms", neuron_scale=[[1.0] * 16, [math.nan] * 16, [1.0] * 16]
            ),
            "neuron_scale[1][0]",
            "nan",
        ),
        (lambda d: d.update(mode="greedy"), "mode", "'greedy'"),
        (lambda d: d["thresholds"].__setitem__(1, -0.1), "thresholds[1]", "-0.1"),
        (lambda d: d["thresholds"].__setitem__(2, math.nan), "thresholds[2]", "nan"),
        (lambda d: d["thresholds"].__setitem__(0, math.inf), "thresholds[0]", "inf"),
        (lambda d: d["thresholds"].__setitem__(0, "0.1"), "thresholds[0]", "'0.1'"),
        (lambda d: d["thresholds"].pop(), "thresholds", "a list of 2"),
        (lambda d: d.pop("calibration"), "calibration", "missing"),
        (lambda d: d["model"].update(num_layers="3"), "model.num_layers", "'3'"),
        (lambda d: d.update(target_sparsity=1.5), "target_sparsity", "1.5"),
        (lambda d: d["heldout"].update(mean_sparsity=None), "heldout.mean_sparsity", "None"),
    ],
)
def test_bad_fields_are_named(tmp_path, edit, field, found):
    path = corrupt(tmp_path, edit)
    with pytest.raises(ThresholdsFileError) as err:
        load_thresholds(path, **SIZES, fingerprint=None)
    message = str(err.value)
    assert str(path) in message
    assert f"field {field}" in message
    assert found in message


@pytest.mark.parametrize(
    ("sizes", "field"),
    [
        (dict(SIZES, num_layers=4), "model.num_layers"),
        (dict(SIZES, hidden_size=9), "model.hidden_size"),
        (dict(SIZES, intermediate_size=17), "model.intermediate_size"),
    ],
)
def test_model_mismatch_names_expected_and_found(tmp_path, sizes, field):
    path = save_thresholds(make_file(), tmp_path / "t.json")
    with pytest.raises(ThresholdsFileError) as err:
        load_thresholds(path, **sizes, fingerprint=None)
    message = str(err.value)
    assert str(path) in message and field in message
    assert f"expected {sizes[field.split('.')[1]]}" in message
    assert f"found {SIZES[field.split('.')[1]]}" in message


def test_fingerprint_mismatch(tmp_path):
    path = save_thresholds(make_file(), tmp_path / "t.json")
    with pytest.raises(ThresholdsFileError, match=r"model\.fingerprint") as err:
        load_thresholds(path, **SIZES, fingerprint="sha256:ffffffffffffffff")
    assert "sha256:ffffffffffffffff" in str(err.value)
    assert "sha256:0123456789abcdef" in str(err.value)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ThresholdsFileError, match="not valid JSON") as err:
        load_thresholds(bad, **SIZES, fingerprint=None)
    assert str(bad) in str(err.value)
    with pytest.raises(ThresholdsFileError, match="cannot read"):
        load_thresholds(tmp_path / "nope.json", **SIZES, fingerprint=None)


def test_error_is_a_value_error():
    assert issubclass(ThresholdsFileError, ValueError)


def test_save_refuses_invalid(tmp_path):
    with pytest.raises(ThresholdsFileError, match="thresholds"):
        save_thresholds(make_file(thresholds=[0.1, -1.0, 0.2]), tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
