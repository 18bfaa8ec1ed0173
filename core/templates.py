"""The hand-crafted prompts, per reference repository: each method reads the table its own reference code uses.

The reference repositories do not share one table. Where hand-crafted text features enter a method
(zero-shot CLIP, KgCoOp's consistency term, PromptSRC's text regulariser, GPT's hand-crafted view,
MuGCP's consistency term), the method declares which table it uses (`PromptMethod.templates`) and
`templates_for(table, dataset)` gives its prompts for a dataset. Read from the reference code:

- ``coop``: `CUSTOM_TEMPLATES` of KaiyangZhou/CoOp `trainers/zsclip.py` (zero-shot CLIP); the
  `trainers/zsclip.py` of muzairkhattak/multimodal-prompt-learning and of muzairkhattak/PromptSRC
  carry the same table, entry for entry.
- ``kgcoop``: `CUSTOM_TEMPLATES` of htyao89/KgCoOp `KgCoOp/trainers/kgcoop.py`, the table its
  consistency term reads. It differs from CoOp's for DTD only ("a photo of a {}, a type of texture."
  against "{} texture."). (KgCoOp's own `zsclip.py` holds yet another variant that its training never reads.)
- ``imagenet60``: `IMAGENET_TEMPLATES` of muzairkhattak/PromptSRC `trainers/imagenet_templates.py`,
  60 of the 80 prompts of OpenAI's ImageNet ensemble, in that file's order, used for every dataset:
  PromptSRC averages the frozen text features over them.

Keys are mugcp's dataset names (`core/coop_datasets.py`); a test checks every dataset has an entry
in every per-dataset table and pins every dataset x method pair.
"""

from __future__ import annotations

from mugcp.core.errors import UserError

COOP = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

KGCOOP = {**COOP, "dtd": "a photo of a {}, a type of texture."}

IMAGENET60 = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)

PER_DATASET = {"coop": COOP, "kgcoop": KGCOOP}
TABLES = (*PER_DATASET, "imagenet60")


def templates_for(table: str, dataset: str) -> tuple[str, ...]:
    """The hand-crafted prompts ("... {} ...") that reference table `table` uses for `dataset`."""
    if table == "imagenet60":
        return IMAGENET60
    if table not in PER_DATASET:
        raise ValueError(f"unknown template table '{table}' (known: {', '.join(TABLES)})")
    if dataset not in PER_DATASET[table]:
        raise UserError(f"no hand-crafted template for dataset '{dataset}' in the {table} table")
    return (PER_DATASET[table][dataset],)
