"""The demo presets write configs the pipeline accepts, with the data and students their comments promise."""

from __future__ import annotations

import csv

import pytest
from slimflow.flows.config import load_config
from slimflow.flows.demo import PRESETS, write_demo_config


def _rows(path) -> int:
    with open(path, encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1  # minus the header


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_config_loads_with_its_sizes(tmp_path, preset):
    p = PRESETS[preset]
    config = load_config(write_demo_config(str(tmp_path), preset))
    assert config.students == p["students"]
    assert config.augment.n_iter == p["augment"]["n_iter"]
    assert _rows(tmp_path / "data" / "train.csv") == p["labelled"]
    unlabelled = _rows(tmp_path / "data" / "unlabelled.csv")
    if p["unlabelled"] is None:
        assert unlabelled > 10000  # the whole rest of the pool
    else:
        assert unlabelled == p["unlabelled"]


def test_full_preset_trains_the_transformer_student_with_the_bench_winner(tmp_path):
    config = load_config(write_demo_config(str(tmp_path), "full"))
    assert "transformer" in config.students
    assert config.transformer.losses == {"kl": 1.0}
    # it reads as many tokens as the teacher: at 64 of the teacher's 128 its accuracy was capped by the cut
    assert config.transformer.max_len == config.teacher.max_length == 128
    # the quick preset keeps to the small students (its 15-minute budget)
    quick = load_config(write_demo_config(str(tmp_path / "quick"), "quick"))
    assert "transformer" not in quick.students


def test_unknown_preset_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="quick"):
        write_demo_config(str(tmp_path), "huge")


def test_data_of_an_earlier_preset_version_is_exported_again(tmp_path, monkeypatch):
    from slimflow.flows import demo

    write_demo_config(str(tmp_path), "quick")
    train = tmp_path / "data" / "train.csv"
    first = train.read_bytes()
    # the same sizes again: the files are kept as they are (the run's cache keys on their content)
    write_demo_config(str(tmp_path), "quick")
    assert train.read_bytes() == first
    # the preset changed its sizes since this directory was made: the data follows the preset
    monkeypatch.setitem(demo.PRESETS, "quick", {**PRESETS["quick"], "labelled": 500})
    write_demo_config(str(tmp_path), "quick")
    assert _rows(train) == 500
