"""Zero-shot eval through the CLI equals a direct open_clip computation; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line, cli, run_cli
from mugcp.core.coop_datasets import load_dataset
from mugcp.core.frozen_clip import encode_text, load_clip, model_id_for
from mugcp.core.protocol import subsample_classes


def direct_zeroshot_accuracy(frozen, root, split):
    """Plain open_clip: encode_text on the templates, encode_image on every test image."""
    s = load_dataset("dtd", root)
    test, train = subsample_classes(s.test, s.train, subsample=split, labels_from=s.train)
    names = {i.label: i.classname for i in train}
    prompts = [f"{names[i]} texture." for i in range(len(names))]
    model = frozen.model
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(frozen.tokenize(prompts)), dim=-1)
        images = torch.stack([frozen.test_transform(Image.open(s.abspath(i))) for i in test])
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    pred = (image @ text.T).argmax(-1)
    labels = torch.tensor([i.label for i in test])
    return 100.0 * (pred == labels).float().mean().item(), len(test)


@pytest.mark.parametrize("split", ["base", "novel", "all"])
def test_zeroshot_cli_matches_open_clip(tmp_path, synth_root, tiny_clip, frozen_tiny, split):
    out = tmp_path / "runs"
    r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", synth_root, "--split", split,
                "--clip", tiny_clip[0], "--pretrained", tiny_clip[1], "--output", out, "--json", "--workers", "0")
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "dtd" / "zeroshot" / "seed1" / f"results_{split}.json").read_text())
    expected, n = direct_zeroshot_accuracy(frozen_tiny, synth_root, split)
    assert record["num_images"] == n == {"base": 72, "novel": 69, "all": 141}[split]
    assert record["accuracy"] == pytest.approx(expected, abs=1e-3)
    for key in ("dataset", "method", "split", "seed", "accuracy", "num_images"):
        assert key in record
    assert json.loads(r.stdout) == record  # --json prints the record written
    if split == "all":  # the folder holds this CLIP's results: another CLIP's are refused, not written over them
        r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", synth_root, "--split", split,
                "--clip", tiny_clip[0], "--pretrained", "none", "--output", out, "--workers", "0")
        assert_one_line(r, f"holds zeroshot results of another CLIP or data (clip: {record['clip']} -> ",
                        "another --output")
        # ... and so are results on another split of the data, even for another --split: Base and Novel of one
        # folder make one HM
        import shutil

        shutil.copytree(synth_root / "dtd", tmp_path / "other" / "dtd")
        split_file = next((tmp_path / "other" / "dtd").glob("split_*.json"))
        lists = json.loads(split_file.read_text())
        split_file.write_text(json.dumps({**lists, "test": lists["test"][:-1]}))
        r = cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", tmp_path / "other", "--split", "base",
                "--clip", tiny_clip[0], "--pretrained", tiny_clip[1], "--output", out, "--workers", "0")
        assert_one_line(r, "results_all.json holds zeroshot results of another CLIP or data (split_digest: ")
        assert json.loads((out / "dtd" / "zeroshot" / "seed1" / "results_all.json").read_text()) == record


def test_text_encoder_cut_at_eot_is_exact(frozen_tiny):
    tokens = frozen_tiny.tokenize(["banded texture.", "a much longer prompt about a zigzagged woven texture."])
    full = frozen_tiny.model.encode_text(tokens)
    assert torch.allclose(encode_text(frozen_tiny.model, tokens), full, atol=1e-5)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def zs(root, *extra):
    return cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", root, "--workers", "0", *extra)


@pytest.fixture
def tiny_args(tiny_clip):
    return ("--clip", str(tiny_clip[0]), "--pretrained", str(tiny_clip[1]))


@pytest.fixture
def data_copy(tmp_path, synth_root):
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst


def test_missing_root(tmp_path, tiny_args):
    assert_one_line_error(zs(tmp_path / "nowhere", *tiny_args), "dataset root not found", "nowhere")


def test_unknown_dataset(tmp_path, tiny_args):
    r = run_cli("eval", "--method", "zeroshot", "--dataset", "textures", "--root", tmp_path, *tiny_args)  # a real process
    assert_one_line_error(r, "unknown dataset 'textures'")


def test_split_file_not_json(data_copy, tiny_args):
    (data_copy / "dtd" / "split_zhou_DescribableTextures.json").write_text("[1, 2")
    assert_one_line_error(zs(data_copy, *tiny_args), "not valid JSON", "split_zhou_DescribableTextures.json")


def test_split_points_outside_root(data_copy, tiny_args):
    path = data_copy / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(path.read_text())
    split["test"][0][0] = "../../../etc/hosts"
    path.write_text(json.dumps(split))
    assert_one_line_error(zs(data_copy, *tiny_args), "outside the dataset folder")


def test_listed_image_absent(data_copy, tiny_args):
    split = json.loads((data_copy / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    (data_copy / "dtd" / "images" / split["test"][3][0]).unlink()
    assert_one_line_error(zs(data_copy, *tiny_args), "1 image(s)", "missing", split["test"][3][0])


def test_unreadable_image(data_copy, tiny_args):
    split = json.loads((data_copy / "dtd" / "split_zhou_DescribableTextures.json").read_text())
    (data_copy / "dtd" / "images" / split["test"][0][0]).write_bytes(b"not a jpeg at all")
    assert_one_line_error(zs(data_copy, *tiny_args), "cannot read image", split["test"][0][0])


def test_unknown_clip_and_missing_checkpoint(synth_root, tmp_path, tiny_clip):
    assert_one_line_error(zs(synth_root, "--clip", "ViT-Q-99", "--pretrained", "openai"), "unknown CLIP model 'ViT-Q-99'")
    assert_one_line_error(zs(synth_root, "--clip", tiny_clip[0], "--pretrained", tmp_path / "nope.safetensors"),
                          "CLIP checkpoint not found")
    assert_one_line_error(zs(synth_root, "--clip", tmp_path / "none.json"), "CLIP config not found")


def test_checkpoints_that_do_not_load_and_weights_that_cannot_be_had(synth_root, tmp_path, tiny_clip):
    """A damaged or foreign checkpoint, or a tag whose weights are not cached offline: one line, no traceback."""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert_one_line_error(zs(synth_root, "--clip", tiny_clip[0], "--pretrained", tmp_path / "empty.safetensors"),
                          "cannot be loaded into CLIP", "empty.safetensors")
    assert_one_line_error(zs(synth_root, "--clip", "ViT-B-32", "--pretrained", tiny_clip[1]),
                          "cannot be loaded into CLIP ViT-B-32")
    r = run_cli("eval", "--method", "zeroshot", "--dataset", "dtd", "--root", synth_root, "--clip", "ViT-B-32",
                "--pretrained", "openai", "--output", tmp_path / "runs", env={"HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(r, "cannot get the 'openai' weights of CLIP ViT-B-32", "offline?")
    assert "HF_HUB_OFFLINE=1" not in r.stderr  # set (run_cli sets it): nothing to add


def test_weights_that_cannot_be_had_online_name_the_offline_switch(monkeypatch):
    """Without HF_HUB_OFFLINE the hub retries for about a minute before failing offline: the error says how to skip
    that wait next time (the download itself is stood in for, so the test waits for nothing)."""
    import open_clip

    from mugcp.core.errors import UserError
    from mugcp.core.frozen_clip import load_clip

    def unreachable(*args, **kwargs):
        raise OSError("Failed to download file: connection refused")

    monkeypatch.setattr(open_clip, "create_model", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="offline, HF_HUB_OFFLINE=1 skips"):
        load_clip("ViT-B-32", "openai", torch.device("cpu"))


def test_models_the_surgery_cannot_drive_are_refused(synth_root):
    """A ResNet image tower has no token sequence for prompts: refused on one line, before any work."""
    assert_one_line_error(zs(synth_root, "--clip", "RN50", "--pretrained", "none"),
                          "CLIP model 'RN50' cannot carry prompts", "ModifiedResNet")


def test_unknown_pretrained_tag(synth_root):
    assert_one_line_error(zs(synth_root, "--clip", "ViT-B-16", "--pretrained", "nonsense"),
                          "unknown pretrained tag 'nonsense'")


def test_synth_and_tiny_commands(tmp_path):
    r = cli("data", "synth", "--out", tmp_path, "--per-class", "4")
    assert r.returncode == 0, r.stderr
    spaced = tmp_path.parent / f"{tmp_path.name} spaced"
    r = cli("data", "synth", "--out", spaced, "--per-class", "4", "--size", "8")
    assert r.stdout.strip().endswith(f"--root {shlex.quote(str(spaced))})")  # a command to paste
    shutil.rmtree(spaced)
    s = load_dataset("dtd", tmp_path)
    assert len({i.label for i in s.test}) == 47 and len(s.train) == 47 * 2
    too_few = cli("data", "synth", "--out", tmp_path, "--per-class", "3")
    assert_one_line_error(too_few, "--per-class")
    # written whole, or not at all; it replaces a dataset it wrote, never the user's own
    import mugcp.world.synth as synth

    def interrupted(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    real_write, before = synth.write_synthetic_dtd, sorted(p.name for p in (tmp_path / "dtd" / "images").iterdir())
    synth.write_synthetic_dtd = interrupted
    try:
        assert cli("data", "synth", "--out", tmp_path, "--per-class", "6").returncode == 130
    finally:
        synth.write_synthetic_dtd = real_write
    assert len(load_dataset("dtd", tmp_path).train) == 47 * 2 and sorted(p.name for p in tmp_path.iterdir()) == ["dtd"]
    assert sorted(p.name for p in (tmp_path / "dtd" / "images").iterdir()) == before
    # a write that was killed (no cleanup ran) leaves its staging folder: the next write removes it, and not a
    # staging folder of a write still running
    import socket
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    (tmp_path / f".synth-{host}-{gone.pid}-deadbeef" / "dtd").mkdir(parents=True)
    (tmp_path / f".synth-{host}-{os.getpid()}-0badcafe").mkdir()
    assert cli("data", "synth", "--out", tmp_path, "--per-class", "6").returncode == 0
    assert len(load_dataset("dtd", tmp_path).train) == 47 * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".synth-{host}-{os.getpid()}-0badcafe", "dtd"]
    (tmp_path / "mine" / "dtd").mkdir(parents=True)
    assert_one_line_error(cli("data", "synth", "--out", tmp_path / "mine"), "was not written by `mugcp data synth`")
    assert re.search(r"greater than or equal to 4\b|\b4<=x", too_few.stderr), too_few.stderr  # typer >= 0.29 / older


@pytest.mark.parametrize("quick", [True, False])
def test_weights_trained_with_quickgelu_get_quickgelu(tiny_clip, monkeypatch, quick):
    """open_clip 3 builds `ViT-B-16` with GELU under its `openai` tag, whose weights were trained with QuickGELU,
    and only warns: not OpenAI's CLIP. mugcp builds the activation a tag's weights were trained with and names the
    model as its -quickgelu twin. A tag of the tiny CLIP's own stands in for `openai` (the weights cannot be had)."""
    import open_clip
    from open_clip import pretrained as registry

    name = Path(tiny_clip[0]).stem
    load_clip(str(tiny_clip[0]), "none")  # registers its config
    monkeypatch.setitem(registry._PRETRAINED, name, {"web": {"hf_hub": "nowhere/", "quick_gelu": quick}})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(tiny_clip[1]))
    frozen = load_clip(str(tiny_clip[0]), "web")
    activations = {type(m).__name__ for m in frozen.model.modules()}
    assert ("QuickGELU" in activations) == quick and ("GELU" in activations) != quick
    assert frozen.model_id == f"{name}{'-quickgelu' if quick else ''}@web"
    assert model_id_for("ViT-B-16", "openai") == model_id_for("ViT-B-16-quickgelu", "openai") == "ViT-B-16-quickgelu@openai"
    assert model_id_for("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16@laion2b_s34b_b88k"  # trained with GELU


def test_synth_refuses_a_linked_dataset_folder(tmp_path):
    """Replaced, the link would become a folder on this disk while the disk it names kept the old data."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dtd").symlink_to(tmp_path / "elsewhere")
    assert_one_line_error(cli("data", "synth", "--out", tmp_path / "out", "--per-class", "4"), "dtd is a link",
                          str(tmp_path / "elsewhere"))
    assert (tmp_path / "out" / "dtd").is_symlink() and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dtd"]
