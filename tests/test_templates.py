"""Every method reads its own reference's hand-crafted prompts: every dataset x method pair is pinned."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from mugcp.core.coop_datasets import DATASETS
from mugcp.core.frozen_clip import encode_text
from mugcp.core.templates import templates_for
from mugcp.trainer.config import load_config
from mugcp.trainer.methods import available_methods, build_method, method_class

# KaiyangZhou/CoOp trainers/zsclip.py CUSTOM_TEMPLATES (the same in MaPLe's and PromptSRC's zsclip.py)
COOP_ZERO_SHOT = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.", "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.",
}
# htyao89/KgCoOp KgCoOp/trainers/kgcoop.py CUSTOM_TEMPLATES: CoOp's but for DTD
KGCOOP = {**COOP_ZERO_SHOT, "dtd": "a photo of a {}, a type of texture."}
# sha256 of "\n".join(IMAGENET_TEMPLATES) of muzairkhattak/PromptSRC trainers/imagenet_templates.py (60 prompts)
PROMPTSRC_SHA256 = "dc3398ed3ffc7c259342582bc0f36d7ac66c4dee17981a37b77b0fc9c23d4f72"

EXPECTED_TABLE = {"zeroshot": COOP_ZERO_SHOT, "coop": COOP_ZERO_SHOT, "cocoop": COOP_ZERO_SHOT,
                  "maple": COOP_ZERO_SHOT, "gpt": COOP_ZERO_SHOT, "mugcp": COOP_ZERO_SHOT, "kgcoop": KGCOOP,
                  "promptsrc": "imagenet60"}


def test_every_method_and_dataset_is_pinned():
    assert set(EXPECTED_TABLE) == set(available_methods())
    assert set(COOP_ZERO_SHOT) == set(DATASETS)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("method", sorted(EXPECTED_TABLE))
def test_method_uses_its_reference_template(method, dataset):
    templates = templates_for(method_class(method).template_table, dataset)
    expected = EXPECTED_TABLE[method]
    if expected == "imagenet60":
        assert len(templates) == 60
        assert hashlib.sha256("\n".join(templates).encode()).hexdigest() == PROMPTSRC_SHA256
    else:
        assert templates == (expected[dataset],)


def test_kgcoop_and_promptsrc_features_come_from_their_tables(frozen_tiny):
    """KgCoOp's DTD term reads "a photo of a {}, a type of texture."; PromptSRC averages 60 raw features, then normalises."""
    names = ["banded", "zig_zag"]
    model = frozen_tiny.model

    def raw(*templates):
        prompts = [t.format(n.replace("_", " ")) for t in templates for n in names]
        return encode_text(model, frozen_tiny.tokenize(prompts)).float()

    kgcoop = build_method("kgcoop", frozen_tiny, names, "dtd", load_config("kgcoop").method)
    assert torch.allclose(kgcoop.handcrafted, F.normalize(raw("a photo of a {}, a type of texture."), dim=-1))
    coop_view = F.normalize(raw("{} texture."), dim=-1)
    assert (kgcoop.handcrafted - coop_view).abs().max() > 1e-3  # the two tables really differ here
    promptsrc = build_method("promptsrc", frozen_tiny, names, "dtd", load_config("promptsrc").method)
    per_template = raw(*promptsrc.templates).view(len(promptsrc.templates), len(names), -1)  # one batched pass
    assert torch.allclose(promptsrc.handcrafted, F.normalize(per_template.mean(0), dim=-1), atol=1e-6)
    mean_of_normalised = F.normalize(F.normalize(per_template, dim=-1).mean(0), dim=-1)
    assert (promptsrc.handcrafted - mean_of_normalised).abs().max() > 1e-5  # raw features are averaged, as PromptSRC does
