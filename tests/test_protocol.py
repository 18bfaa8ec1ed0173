"""The few-shot draw and base/novel split follow the reference rule exactly."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from mugcp.core.coop_datasets import DATASETS, Item, Splits, load_dataset
from mugcp.core.errors import UserError
from mugcp.core.protocol import Draw, draw_fewshot, harmonic_mean, subsample_classes


def shuffled_items(n_classes=5, per_class=9, seed=0, prefix="tr"):
    """Items whose labels first appear in a non-sorted order, so label order and appearance order differ."""
    items = [Item(f"{prefix}/{c}/{i}.jpg", c, f"class{c}") for c in range(n_classes) for i in range(per_class)]
    random.Random(seed).shuffle(items)
    return items


def reference_draw(train, val, k, seed):
    """The rule as DESIGN states it, written out independently: seed, group by first appearance, sample."""
    random.seed(seed)
    out = []
    for part, shots in ((train, k), (val, min(k, 4))):
        order, groups = [], {}
        for it in part:
            if it.label not in groups:
                order.append(it.label)
                groups[it.label] = []
            groups[it.label].append(it)
        picked = []
        for label in order:
            g = groups[label]
            picked += random.sample(g, shots) if len(g) >= shots else g
        out.append(picked)
    return out


def make_splits(train, val, test):
    return Splits(DATASETS["dtd"], None, train, val, test)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_fewshot_matches_reference_rule(seed, k):
    train, val = shuffled_items(prefix="tr"), shuffled_items(per_class=5, seed=1, prefix="va")
    draw = draw_fewshot(make_splits(train, val, []), k, seed)
    ref_train, ref_val = reference_draw(train, val, k, seed)
    assert draw.train == ref_train and draw.val == ref_val
    assert len(draw.train) == 5 * k and len(draw.val) == 5 * min(k, 4)
    # determinism, and seeds really differ
    assert draw_fewshot(make_splits(train, val, []), k, seed).train == draw.train
    if k < 9:
        assert draw_fewshot(make_splits(train, val, []), k, seed + 10).train != draw.train


def test_grouping_is_by_first_appearance_not_sorted_label():
    train = shuffled_items()
    random.seed(1)
    by_sorted = [it for lab in range(5) for it in random.sample([i for i in train if i.label == lab], 4)]
    assert draw_fewshot(make_splits(train, train, []), 4, 1).train != by_sorted


def test_a_class_with_fewer_than_k_images_gives_all_of_them():
    """Dassl's rule: all items of a short class, drawing nothing for it; the draw records and names them."""
    train = shuffled_items(per_class=9) + [Item(f"tr/5/{i}.jpg", 5, "class5") for i in range(3)] + \
        [Item(f"tr/6/{i}.jpg", 6, "class6") for i in range(5)]
    val = shuffled_items(per_class=2, seed=1, prefix="va") + [Item("va/5/0.jpg", 5, "class5")]
    for k in (4, 8, 16):
        draw = draw_fewshot(make_splits(train, val, []), k, 1)
        ref_train, ref_val = reference_draw(train, val, k, 1)
        assert draw.train == ref_train and draw.val == ref_val
        sizes = Counter(i.label for i in train)
        assert draw.fewer_than_shots["train"] == [[c, sizes[c]] for c in dict.fromkeys(i.label for i in train)
                                                  if sizes[c] < k]
        assert len(draw.fewer_than_shots["val"]) == 6  # min(k, 4) = 4 > the 2 (or 1) val images of every class
    assert draw.note == ("few-shot draw of dtd: 7 class(es) have fewer than 16 train images (3-9), all taken; "
                         "6 class(es) have fewer than 4 val images (1-2), all taken")
    assert draw_fewshot(make_splits(train, train, []), 2, 1).note is None


def test_too_few_shots_is_a_clear_error():
    with pytest.raises(UserError, match="--shots must be at least 1"):
        draw_fewshot(make_splits(shuffled_items(), shuffled_items(), []), 0, 1)


def test_draw_round_trips_through_json(tmp_path):
    for k in (2, 12):  # 12: every class short, recorded in the JSON
        draw = draw_fewshot(make_splits(shuffled_items(), shuffled_items(), []), k, 1)
        draw.save(tmp_path / "d.json")
        assert Draw.load(tmp_path / "d.json") == draw
    assert len(draw.fewer_than_shots["train"]) == 5


@pytest.mark.parametrize("n", [2, 5, 47, 100])
def test_base_novel_split(n):
    items = shuffled_items(n_classes=n, per_class=2)
    base, = subsample_classes(items, subsample="base")
    novel, = subsample_classes(items, subsample="novel")
    m = math.ceil(n / 2)
    assert {i.label for i in base} == set(range(m))
    assert {i.label for i in novel} == set(range(n - m))
    assert {i.classname for i in novel} == {f"class{c}" for c in range(m, n)}
    assert len(base) + len(novel) == len(items)
    # a novel item keeps its image, only the label moves down by m
    orig = {i.path: i.label for i in items}
    assert all(orig[i.path] == i.label + m for i in novel)
    assert subsample_classes(items, subsample="all") == (items,)


def test_split_applies_to_all_parts_with_train_labels():
    train, test = shuffled_items(n_classes=4), shuffled_items(n_classes=4, prefix="te")
    b_train, b_test = subsample_classes(train, test, subsample="novel")
    assert {i.label for i in b_test} == {0, 1} and {i.classname for i in b_test} == {"class2", "class3"}


def test_harmonic_mean_of_seed_averages():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714, abs=1e-4)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_synthetic_dtd_protocol(synth_root):
    s = load_dataset("dtd", synth_root)
    draw = draw_fewshot(s, 4, 1)
    assert len(draw.train) == 47 * 4 and len(draw.val) == 47 * 2
    base_train, = subsample_classes(draw.train, subsample="base")
    assert len({i.label for i in base_train}) == 24


def _dassl_pickle(path, data):
    """A pickle as Dassl writes one: Datum objects of the module its class lives in (put there for the dump)."""
    import pickle
    import sys
    import types

    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    module = types.ModuleType(names[-1])

    class Datum:
        def __init__(self, impath, label, domain, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    sys.modules.update({name: types.ModuleType(name) for name in names[:-1]}, **{names[-1]: module})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps({"train": [Datum(*d) for d in data]}, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for name in names:
            del sys.modules[name]


def test_imagenet_trains_on_the_references_own_draw_where_it_left_one(tmp_path):
    """The reference lists ImageNet's class folders in the file system's order, so its draw for a seed is the
    machine's; where its reader cached that draw in the data folder, mugcp reads it (paths as the reference's
    machine wrote them), in its order, and records where it came from; one drawn from other data is refused."""
    from mugcp.world.imagenet_layouts import write_synthetic_imagenet

    write_synthetic_imagenet(tmp_path, classes=4, train=6, test=2, size=8)
    splits = load_dataset("imagenet", tmp_path)
    ours = draw_fewshot(splits, 2, 1)
    assert ours.source is None
    theirs = [it for it in reversed(splits.train) if it not in ours.train][::3][:8]  # another choice, another order
    cache = splits.root / "split_fewshot" / "shot_2-seed_1.pkl"
    _dassl_pickle(cache, [(f"/home/someone/DATA/imagenet/{it.path}", it.label, -1, it.classname) for it in theirs])
    drawn = draw_fewshot(splits, 2, 1)
    assert drawn.train == theirs and drawn.source["file"] == str(cache) and len(drawn.source["sha256"]) == 64
    assert "the reference's own draw, read from" in drawn.note
    drawn.save(tmp_path / "fewshot.json")
    assert Draw.load(tmp_path / "fewshot.json").source == drawn.source
    assert draw_fewshot(splits, 2, 2).source is None  # another seed: no cached draw, drawn here
    _dassl_pickle(cache, [("/x/imagenet/images/train/n00000000/gone.JPEG", 0, -1, theirs[0].classname)])
    with pytest.raises(UserError, match="draws /x/imagenet/images/train/n00000000/gone.JPEG .* does not hold"):
        draw_fewshot(splits, 2, 1)
    import os
    import pickle

    cache.write_bytes(pickle.dumps({"train": [os.system]}))  # a pickle that would run code: not read
    with pytest.raises(UserError, match="is not a reference draw .*not Dassl's Datum"):
        draw_fewshot(splits, 2, 1)
