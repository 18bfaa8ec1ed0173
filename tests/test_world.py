"""The built-in world: attribute-defined classes, answers scored against them, models built once and cached."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

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


def test_a_grey_copy_hides_colour_and_keeps_each_images_colour_answer(tmp_path, tiny_clip):
    """world/hidden_colour.py: what a colour-blind CLIP is shown (the same dataset, every image in greyscale)
    and what SCP is made of there (for each grey image, the answer its colour original got)."""
    from PIL import Image

    from conftest import answers_by_path, described_dtd
    from mugcp.world.hidden_colour import colour_answers, grey_copy

    colour = described_dtd(tmp_path / "colour", tiny_clip)
    (colour / "dtd" / "world.json").write_text("{}")  # a demo's stamp: says nothing about the grey copy
    grey = grey_copy(colour, tmp_path / "grey")
    assert not (grey / "dtd" / "world.json").exists()
    assert (grey / "dtd" / "attributes.json").read_bytes() == (colour / "dtd" / "attributes.json").read_bytes()
    before, after = load_dataset("dtd", colour), load_dataset("dtd", grey)
    assert [(i.path, i.label) for i in after.train + after.test] == [(i.path, i.label) for i in before.train + before.test]
    spread = []
    for item in before.train + before.val + before.test:
        shown = np.asarray(Image.open(grey / "dtd" / item.path), dtype=np.int16)
        original = Image.open(colour / "dtd" / item.path)
        assert np.abs(shown - shown[..., :1]).max() <= 2  # R = G = B up to JPEG rounding
        assert np.abs(shown[..., 0] - np.asarray(original.convert("L"), dtype=np.int16)).mean() < 3
        rgb = np.asarray(original, dtype=np.int16)
        spread.append(np.abs(rgb - rgb[..., :1]).max())
    assert np.mean(np.array(spread) > 30) > 0.8  # the originals had colour to lose (black on white has none)

    answers, truth = colour_answers(colour / "cache", grey), answers_by_path(colour / "cache")
    assert len(answers) == len(truth) >= 47 * 3  # every image the stand-in described
    for path, row in truth.items():
        assert answers[hashlib.sha256((grey / "dtd" / path).read_bytes()).hexdigest()] == json.dumps(row["phrases"])
    first = grey / "dtd" / next(iter(truth))
    first.write_bytes(b"changed")
    grey_copy(colour, tmp_path / "grey")  # made once: a second call rewrites nothing
    assert first.read_bytes() == b"changed"


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


BUILDERS = """
import os, time
import torch

def build(folder, recipe, log):
    with open(recipe["journal"], "a") as journal:
        journal.write(f"start {os.getpid()}\\n")
    log("[world] building a thing")
    time.sleep(recipe.get("sleep", 0))
    (folder / "weights").write_text(f"{torch.get_num_threads()} {torch.backends.cpu.get_cpu_capability()}")
    with open(recipe["journal"], "a") as journal:
        journal.write(f"end {os.getpid()}\\n")

def broken(folder, recipe, log):
    (folder / "half").write_text("x")
    raise RuntimeError("killed")
"""


@pytest.fixture
def builders(tmp_path, monkeypatch):
    """A module of test builders the build's child process can import, and an empty MUGCP_HOME."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "thing_builders.py").write_text(BUILDERS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mods"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MUGCP_HOME", str(tmp_path / "home"))
    source = tmp_path / "builder.py"
    source.write_text("steps = 1\n")
    return source, tmp_path / "journal"


def test_builds_run_one_at_a_time_and_a_waiting_one_reuses_the_model(builders, tmp_path):
    """Two builds at once oversubscribe the cores; the second waits, then finds the model the first built."""
    import threading

    source, journal = builders
    recipe = {"journal": str(journal), "sleep": 1}
    key = model_cache.recipe_key({**recipe, "numerics": model_cache.PINNED_NUMERICS}, [source])
    stale = tmp_path / "home" / "world" / f".thing-{key}.dead.tmp"
    stale.mkdir(parents=True)  # what a killed build leaves
    first_logs, logs = [], []
    first = threading.Thread(target=model_cache.cached_build,
                             args=("thing", recipe, [source], "thing_builders:build", first_logs.append))
    first.start()
    deadline = time.monotonic() + 60
    while not journal.exists() and time.monotonic() < deadline:  # the first build's child has started
        time.sleep(0.05)
    second = model_cache.cached_build("thing", recipe, [source], "thing_builders:build", log=logs.append)
    first.join()
    assert [line.split()[0] for line in journal.read_text().splitlines()] == ["start", "end"]  # built once
    assert (second / "weights").is_file() and not stale.exists()
    assert any("waiting for another process's build" in line for line in logs), logs
    assert "[world] building a thing" in first_logs  # the child's progress reaches the caller's log


def test_cached_build_builds_once_and_never_half(builders, tmp_path):
    source, journal = builders
    recipe = {"journal": str(journal)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = model_cache.cached_build("thing", recipe, [source], "thing_builders:build")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    again = model_cache.cached_build("thing", recipe, [source], "thing_builders:build")
    assert first == again and len(journal.read_text().splitlines()) == 2
    assert json.loads((first / "recipe.json").read_text()) == {"kind": "thing", **recipe}
    built_with = json.loads((first / "built_with.json").read_text())
    assert built_with["sha256"]["weights"] == hashlib.sha256((first / "weights").read_bytes()).hexdigest()
    assert model_cache.cached_build("thing", {**recipe, "steps": 2}, [source], "thing_builders:build") != first
    source.write_text('"""What the builder is."""\n# why\nsteps = (\n    1)\n')  # prose and layout only
    assert model_cache.cached_build("thing", recipe, [source], "thing_builders:build") == first
    source.write_text("steps = 2\n")
    assert model_cache.cached_build("thing", recipe, [source], "thing_builders:build") != first  # another builder
    # whatever the caller's thread count
    assert int((first / "weights").read_text().split()[0]) == model_cache.BUILD_THREADS

    with pytest.raises(RuntimeError, match="building the world's broken failed .*RuntimeError: killed"):
        model_cache.cached_build("broken", {}, [source], "thing_builders:broken")
    assert not any(p.name.startswith(("broken", ".broken")) for p in (tmp_path / "home" / "world").iterdir())


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
                    reason="the pinned code path is x86-64's AVX2")
def test_a_world_build_gives_the_same_bytes_whatever_code_path_the_caller_takes(tmp_path, monkeypatch):
    """The caller's CPU code path (here forced through torch's own switch, as another CPU would choose it) does
    not reach the build: 30 pre-training steps of the world's CLIP give the same bytes either way. Without
    `PINNED_NUMERICS` they differ (AVX-512 and AVX2 builds of this CLIP are other weights)."""
    from mugcp.world import tiny_clip

    digests = []
    for capability in ("default", "avx512"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        monkeypatch.setenv("MUGCP_HOME", str(tmp_path / capability))
        folder = model_cache.cached_build("tiny-clip", {**tiny_clip.WORLD_CLIP_RECIPE, "steps": 30},
                                          [Path(tiny_clip.__file__)],
                                          "mugcp.world.tiny_clip:build_world_clip")
        built_with = json.loads((folder / "built_with.json").read_text())
        assert built_with["cpu_capability"] == "AVX2"
        digests.append(model_cache.fingerprint(folder))
    assert digests[0] == digests[1]
