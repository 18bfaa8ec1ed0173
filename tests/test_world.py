"""The built-in world: attribute-defined classes, answers scored against them, models built once and cached."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mugcp.core.coop_datasets import load_dataset
from mugcp.world import model_cache
from mugcp.world.synth import (
    CLASS_ATTRIBUTES,
    COLOURS,
    DTD_CLASSES,
    FAMILIES,
    FAMILY_OF,
    ORIENTED,
    SCALES,
    Attributes,
    apparent_scale,
    describe,
    draw,
    random_attributes,
    read_answer,
    score_answers,
)


def test_classes_are_attribute_combinations_a_sentence_states():
    assert list(CLASS_ATTRIBUTES) == DTD_CLASSES and set(FAMILY_OF) == set(DTD_CLASSES)
    for name, a in CLASS_ATTRIBUTES.items():
        assert a.family == FAMILY_OF[name] and a.bg is None  # the background colour is drawn per image
        assert (a.orientation is not None) == (a.family in ORIENTED)
    by_family = Counter(a.family for a in CLASS_ATTRIBUTES.values())
    assert set(by_family) == set(FAMILIES)
    pairs = [(a.family, a.fg) for a in CLASS_ATTRIBUTES.values()]
    assert len(set(pairs)) == len(pairs)  # family and foreground colour name a class; neither does alone
    assert max(Counter(a.fg for a in CLASS_ATTRIBUTES.values()).values()) > 1 and max(by_family.values()) > 1
    assert FAMILY_OF["striped"] == "stripes" and FAMILY_OF["polka-dotted"] == "dots"


def test_answers_are_read_back_and_scored():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = random_attributes(rng)
        assert read_answer(json.dumps(describe(a))) == {k: v for k, v in a.to_dict().items()}
    truth = {"x": Attributes("stripes", "red", "white", "fine", "diagonal").to_dict(),
             "y": Attributes("dots", "blue", "black", "coarse").to_dict()}
    answers = {"x": '["red stripes", "white background", "fine pattern", "vertical lines"]',
               "y": '["blue dots", "black background", "coarse pattern"]'}
    score = score_answers(answers, truth)
    assert score["family"] == 1.0 and score["orientation"] == 0.5 and score["all"] == 0.5
    assert score_answers({"x": "no idea", "y": ""}, truth)["family"] == 0.0


def test_dataset_records_each_images_attributes(tmp_path):
    from mugcp.world.synth import write_synthetic_dtd

    folder = write_synthetic_dtd(tmp_path, per_class=5, size=32)
    truth = json.loads((folder / "attributes.json").read_text())
    splits = load_dataset("dtd", tmp_path)
    items = splits.train + splits.val + splits.test
    assert len(truth) == len(items) == 47 * 5
    for item in items:
        a, c = truth[item.path], CLASS_ATTRIBUTES[item.classname]
        assert (a["family"], a["fg"], a["scale"], a["orientation"]) == (c.family, c.fg, c.scale, c.orientation)
        assert a["bg"] in COLOURS and a["bg"] != a["fg"]
    assert len({a["bg"] for p, a in truth.items() if "/banded/" in p}) > 1  # background varies within a class


def test_a_magnified_crop_is_named_by_the_scale_it_shows():
    """The world's CLIP sees crops in pre-training; their captions name the scale a viewer would see."""
    assert all(apparent_scale(s, 1.0) == s for s in SCALES)
    assert apparent_scale("fine", SCALES["medium"] / SCALES["fine"]) == "medium"
    assert apparent_scale("fine", SCALES["coarse"] / SCALES["fine"]) == "coarse"
    assert apparent_scale("medium", 1.1) == "medium" and apparent_scale("coarse", 3.5) == "coarse"
    order = list(SCALES)
    for s in SCALES:  # magnifying never makes a pattern look finer
        names = [order.index(apparent_scale(s, z)) for z in np.linspace(1, 3.5, 30)]
        assert names == sorted(names)


def test_drawing_follows_the_attributes():
    rng = np.random.default_rng(1)
    red_on_white = draw(Attributes("stripes", "red", "white", "coarse", "vertical"), rng, 64).astype(float)
    colours = np.array([COLOURS["red"], COLOURS["white"]]) * 255
    nearest = np.abs(red_on_white[..., None, :] - colours).sum(-1).argmin(-1)
    assert 0.3 < nearest.mean() < 0.7  # about half foreground, half background
    assert nearest.mean(0).std() > 3 * nearest.mean(1).std()  # vertical stripes: columns differ, rows do not
    horizontal = draw(Attributes("stripes", "red", "white", "coarse", "horizontal"), rng, 64).astype(float)
    nearest = np.abs(horizontal[..., None, :] - colours).sum(-1).argmin(-1)
    assert nearest.mean(1).std() > 3 * nearest.mean(0).std()


def test_builds_run_one_at_a_time_and_a_waiting_one_reuses_the_model(tmp_path, monkeypatch):
    """Two builds at once oversubscribe the cores; the second waits, then finds the model the first built."""
    import threading
    import time

    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    source = tmp_path / "builder.py"
    source.write_text("# v1\n")
    key = model_cache.recipe_key({"steps": 1}, [source])
    stale = tmp_path / "home" / "world" / f".thing-{key}.dead.tmp"
    stale.mkdir(parents=True)  # what a killed build leaves
    started, running, overlap, logs = threading.Event(), [], [], []

    def build(folder):
        overlap.append(len(running))
        running.append(1)
        started.set()
        time.sleep(0.5)
        (folder / "weights").write_text("w")
        running.pop()

    first = threading.Thread(target=model_cache.cached_build, args=("thing", {"steps": 1}, [source], build))
    first.start()
    started.wait(5)
    second = model_cache.cached_build("thing", {"steps": 1}, [source], build, log=logs.append)
    first.join()
    assert overlap == [0] and (second / "weights").is_file()  # built once, by the first
    assert any("waiting for another process's build" in line for line in logs), logs
    assert not stale.exists()


def test_cached_build_builds_once_and_never_half(tmp_path, monkeypatch):
    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    source = tmp_path / "builder.py"
    source.write_text("# v1\n")
    calls = []

    def build(folder):
        calls.append(torch.get_num_threads())
        (folder / "weights").write_text("w")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = model_cache.cached_build("thing", {"steps": 1}, [source], build)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    again = model_cache.cached_build("thing", {"steps": 1}, [source], build)
    assert first == again and len(calls) == 1 and (first / "weights").read_text() == "w"
    assert json.loads((first / "recipe.json").read_text()) == {"kind": "thing", "steps": 1}
    assert model_cache.cached_build("thing", {"steps": 2}, [source], build) != first  # another recipe
    source.write_text("# v2\n")
    assert model_cache.cached_build("thing", {"steps": 1}, [source], build) != first  # another builder
    assert calls == [model_cache.BUILD_THREADS] * 3  # whatever the caller's thread count

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        model_cache.cached_build("broken", {}, [source], broken)
    assert not any(p.name.startswith(("broken", ".broken")) for p in (tmp_path / "home" / "world").iterdir())
