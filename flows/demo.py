"""``slimflow demo``: the embedded default end to end on the bundled Chinese reviews.

ERNIE Slim's "user provides unlabelled data" setting: a small labelled train split, the rest of the pool as
unlabelled text from the same source, fixed dev and test splits, the default offline teacher.
"""

from __future__ import annotations

import os

import yaml

PRESETS = {
    # quick: under 15 minutes on a 2-core CPU, where the teacher labels ~50 texts/s: 6,000 unlabelled rows and
    # 3 augmented copies per labelled row keep its labelling to ~13k texts.
    "quick": {"labelled": 2000, "unlabelled": 6000, "augment": {"n_iter": 3}, "students": ["bow", "bilstm"],
              "student": {"epochs": 6}},
    # full: the whole unlabelled pool, Tang et al.'s heavier augmentation, every student kind (~20 minutes on
    # a 2-core CPU: 34k texts labelled; minutes on a GPU).
    "full": {"labelled": 2000, "unlabelled": None, "augment": {"n_iter": 10}, "students": ["bow", "cnn", "bilstm"],
             "student": {"epochs": 10}},
}


def write_demo_config(out: str, preset: str) -> str:
    """Export the data into ``out/data`` and write ``out/config.yaml``; returns the config path."""
    from slimflow.tasks.datasets import export_dataset

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    data_dir = os.path.join(out, "data")
    if not all(os.path.exists(os.path.join(data_dir, f"{s}.csv")) for s in ("train", "dev", "test", "unlabelled")):
        export_dataset("zh-reviews", data_dir, labelled=p["labelled"], unlabelled=p["unlabelled"])
    config = {
        "name": f"demo-{preset}",
        "lang": "zh",
        "data": {s: f"data/{s}.csv" for s in ("train", "dev", "test", "unlabelled")},
        "augment": p["augment"],
        "students": p["students"],
        "student": p["student"],
    }
    path = os.path.join(out, "config.yaml")
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, allow_unicode=True, sort_keys=False)
    return path
