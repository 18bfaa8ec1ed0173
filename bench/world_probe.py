"""How much the world's frozen CLIP could give on Base, and how much of it a prompt method fits.

    python bench/world_probe.py --demo /tmp/wdemo [--fits "optim.lr=0.02;method.n_ctx=16&method.ctx_init=''"]
        [--clip CONFIG.json --pretrained WEIGHTS.safetensors]

Needs a finished `mugcp demo --out DIR`. Prints, on the base classes of its data, for the demo's CLIP
or another one (`--clip`, `--pretrained`: e.g. a variant written with `world.tiny_clip.write_tiny_clip`):
- zero-shot accuracy with DTD's template and with CoOp's initial prompt, on the training images, on their
  training crops and on the test images;
- free class embeddings (cosine, CLIP's logit scale) fitted on the protocol's training crops: how far a
  prompt could go if the text tower put each class wherever the loss wants it; scored on the crops
  they were fitted to, on fresh crops of the same images (comparable with a prompt method's training
  accuracy, which is measured on crops drawn anew each epoch) and on the whole test images;
- a linear probe (logistic regression) on the frozen image features of the training images: the
  ceiling a classifier on these features reaches, against what the text side gives; then the same
  probe trained on the protocol's training crops (5 draws per image), as every prompt method is,
  and scored on crops of the test images and on the whole test images;
- CoOp (seed 1, the demo's schedule plus each `--fits` entry: overrides joined by "&") with its
  training accuracy on the augmented shots per epoch (`history.json`: a running figure, while the
  weights still move), its final weights' accuracy on the same fresh crops the free embeddings are
  scored on, and its Base test accuracy.
A diagnostic of the world, not a setting of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

from mugcp.core.coop_datasets import classnames_of, load_dataset, prompt_name  # noqa: E402
from mugcp.core.frozen_clip import load_clip  # noqa: E402
from mugcp.core.protocol import subsample_classes  # noqa: E402
from mugcp.demo import world_run  # noqa: E402
from mugcp.sweep import Job, run_job  # noqa: E402
from mugcp.trainer.evaluation import trained_method  # noqa: E402
from mugcp.trainer.runs import read_run  # noqa: E402


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (logits.argmax(1) == labels).float().mean().item()


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.nn.Linear:
    """Logistic regression on L2-normalised features (logit scale 10, a little weight decay), Adam, 500 steps."""
    probe = torch.nn.Linear(features.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(500):
        loss = F.cross_entropy(probe(10 * features), labels) + 1e-3 * probe.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


@torch.no_grad()
def image_features(frozen, root, items, transform, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised frozen image features of `items` through `transform`, `draws` times each, and their labels."""
    x = torch.stack([transform(Image.open(Path(root) / i.path)) for _ in range(draws) for i in items])
    labels = torch.tensor([i.label for _ in range(draws) for i in items])
    return F.normalize(frozen.model.encode_image(x), dim=-1), labels


def cosine_probe(features: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, scale: float) -> torch.Tensor:
    """Free class embeddings in the prompt methods' classifier form (cosine, CLIP's logit scale), Adam, 500 steps.

    What a prompt could reach if the text tower could put a class anywhere: the fit that separates
    "the text side cannot move far enough" from "these views do not carry the class".
    """
    weights = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([weights], lr=1e-2)
    for _ in range(500):
        loss = F.cross_entropy(scale * features @ F.normalize(weights, dim=-1).T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return F.normalize(weights.detach(), dim=-1)


def main() -> None:
    torch.manual_seed(0)  # the training crops' draws
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True)
    ap.add_argument("--fits", default="optim.lr=0.002;optim.lr=0.02;optim.lr=0.1;optim.epochs=20")
    ap.add_argument("--clip", help="another CLIP's open_clip config (default: the demo's)")
    ap.add_argument("--pretrained", help="its weights")
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = json.loads((args.demo / "runs/dtd/coop/b2n_shots16/seed1/run.json").read_text())
    if args.clip:
        record.update(clip=args.clip, pretrained=args.pretrained)
    frozen = load_clip(record["clip"], record["pretrained"], torch.device("cpu"))
    splits = load_dataset("dtd", record["root"])
    train, test = subsample_classes(splits.train, splits.test, subsample="base")
    names = classnames_of(train)

    def features(items, transform=frozen.test_transform, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return image_features(frozen, splits.root, items, transform, draws)

    (f_train, y_train), (f_test, y_test) = features(train), features(test)
    (c_train, yc_train), (c_test, yc_test) = features(train, frozen.train_transform, 5), features(
        test, frozen.train_transform, 2)
    print(f"base classes {len(names)}, training images {len(train)}, test images {len(test)}, "
          f"logit scale {frozen.model.logit_scale.exp().item():.2f}")
    for template in ("{} texture.", "a photo of a {}."):
        with torch.no_grad():
            text = F.normalize(frozen.model.encode_text(frozen.tokenizer([template.format(prompt_name(n))
                                                                         for n in names])), dim=-1)
        print(f"zero-shot '{template}': train {accuracy(f_train @ text.T, y_train):.2f}  "
              f"training crops {accuracy(c_train @ text.T, yc_train):.2f}  test {accuracy(f_test @ text.T, y_test):.2f}")
    free = cosine_probe(c_train, yc_train, text, frozen.model.logit_scale.exp().item())
    fresh, y_fresh = features(train, frozen.train_transform, 5)  # other draws: what a prompt method's epochs see
    print(f"free class embeddings on training crops (from '{template}'): train crops "
          f"{accuracy(c_train @ free.T, yc_train):.2f}  fresh crops of the training images "
          f"{accuracy(fresh @ free.T, y_fresh):.2f}  whole test images {accuracy(f_test @ free.T, y_test):.2f}")
    torch.manual_seed(0)
    probe = linear_probe(f_train, y_train, len(names))
    with torch.no_grad():
        print(f"linear probe on whole images: train {accuracy(probe(10 * f_train), y_train):.2f}  "
              f"test {accuracy(probe(10 * f_test), y_test):.2f}")
    probe = linear_probe(c_train, yc_train, len(names))
    with torch.no_grad():
        print(f"linear probe on training crops: train crops {accuracy(probe(10 * c_train), yc_train):.2f}  "
              f"test crops {accuracy(probe(10 * c_test), yc_test):.2f}  "
              f"whole test images {accuracy(probe(10 * f_test), y_test):.2f}")

    out = Path(tempfile.mkdtemp(prefix="world-probe-"))
    for i, fit in enumerate(f for f in args.fits.split(";") if f):  # --fits "" for none
        spec = world_run(record["root"], record["clip"], record["pretrained"], record["cache_dir"], "coop", 1,
                         fit.split("&"))
        run_job(Job(spec, [(None, "base")]), out / str(i), torch.device("cpu"), 0, log=lambda _: None)
        run = spec.run_dir(out / str(i))
        history = json.loads((run / "history.json").read_text())
        base = json.loads((run / "results_base.json").read_text())["accuracy"]
        info = read_run(run)
        assert info["classnames"] == names, "the run's classes are not the probe's"
        coop, _ = trained_method(run, info, spec, torch.device("cpu"))
        with torch.no_grad():
            final = accuracy(fresh @ F.normalize(coop.class_features().float(), dim=-1).T, y_fresh)
        print(f"coop {fit}: training accuracy per epoch " + " ".join(f"{h['accuracy']:.1f}" for h in history) +
              f"; its final weights on the fresh crops {final:.2f}; Base test {base:.2f}")


if __name__ == "__main__":
    main()
