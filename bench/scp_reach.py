"""How far does SCP reach into a trained MuGCP? Its test images with their own SCP and with shuffled SCP.

    python bench/scp_reach.py RUN [RUN ...] [--split base]

For each finished MuGCP run (a folder of `mugcp train`), every test image of the split goes through
the trained model twice: with its own SCP and with another test image's (the single random cycle of
`conditions.scp=shuffled`, drawn by the run's seed). Printed per run:
- how many predictions change, and the cosine between the two image features of one image (beside
  the mean cosine between the features of two different test images, for scale, and between the
  prompted features and the frozen CLIP's: how far the vision side moved at all);
- how far the class features move (MPF's shift), relative to their norm;
- per prompted vision layer, the mean norms of AMG's parts: the projected SCP tokens, the grounding
  update the image adds to them, the static VCP queries, and the gated guidance added to the queries;
  and how far shuffling the SCP moves the VCP, relative to their norm.
`mugcp eval --scp shuffled` gives the accuracy; this says where SCP's signal goes. Any dataset, any
CLIP: it reads the run's own record.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUGCP_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mugcp.core.coop_datasets import load_dataset  # noqa: E402
from mugcp.trainer.conditions import Conditions  # noqa: E402
from mugcp.trainer.evaluation import eval_items, trained_method  # noqa: E402
from mugcp.trainer.loaders import iterate, make_loader  # noqa: E402
from mugcp.trainer.methods.mugcp_method import AMG  # noqa: E402
from mugcp.trainer.runs import RunSpec, read_run  # noqa: E402
from mugcp.trainer.train import condition_context  # noqa: E402


def reach(run: Path, split: str, device: torch.device) -> list[str]:
    info = read_run(run)
    spec = RunSpec.from_record(info, run)
    if spec.method != "mugcp":
        raise SystemExit(f"{run}: a {spec.method} run; this reads MuGCP's AMG")
    model, frozen = trained_method(run, info, spec, device)
    splits = load_dataset(spec.dataset, spec.root)
    test, classnames = eval_items(splits, split)
    model.set_classnames(classnames)
    model.eval()
    context = condition_context(spec, frozen, device, splits.root, (info.get("conditions") or {}).get("scp"))
    sources = {c: Conditions(model.reads, dataclasses.replace(context, scp=c), test) for c in ("real", "shuffled")}
    norms: dict[int, list[torch.Tensor]] = {}
    vcps: dict[int, list[torch.Tensor]] = {}  # per layer, each batch's VCP with own SCP, then with shuffled SCP
    layer = AMG.layer

    def measured(self, j, visual, semantic, pad):  # AMG.layer, with its parts' norms recorded
        grounded, vcp = layer(self, j, visual, semantic, pad)
        queries = self.queries[j].expand(visual.shape[0], -1, -1)
        norms.setdefault(j, []).append(torch.stack([semantic.norm(dim=-1).mean(), (grounded - semantic).norm(
            dim=-1).mean(), queries.norm(dim=-1).mean(), (vcp - queries).norm(dim=-1).mean()]))
        vcps.setdefault(j, []).append(vcp)
        return grounded, vcp

    image, classes, pred = ({c: [] for c in sources} for _ in range(3))
    frozen_features = []
    AMG.layer = measured
    try:
        loader = make_loader(test, splits.root, frozen.test_transform, frozen.image_size, 64, workers=0)
        with torch.no_grad():
            for images, _, index in iterate(loader, device):
                frozen_features.append(model.frozen_image_features(images.to(device)))
                for c, source in sources.items():
                    conditions = source(index)
                    feats, instance = model.encode_image(images.to(device), conditions["scp"], conditions["scp_mask"])
                    text = model.class_features(instance)
                    image[c].append(F.normalize(feats.float(), dim=-1))
                    classes[c].append(text.float())
                    pred[c].append(model.cosine_logits(feats, text).argmax(-1))
    finally:
        AMG.layer = layer
    real, shuffled = torch.cat(image["real"]), torch.cat(image["shuffled"])
    t_real, t_shuffled = torch.cat(classes["real"]), torch.cat(classes["shuffled"])
    changed = (torch.cat(pred["real"]) != torch.cat(pred["shuffled"])).float().mean()
    lines = [f"{run} ({split}, {len(test)} images): predictions changed {100 * float(changed):.1f}%; image features, "
             f"own vs shuffled SCP: cos {float((real * shuffled).sum(-1).mean()):.4f} (two different images: "
             f"{float((real[:-1] * real[1:]).sum(-1).mean()):.4f}; own SCP vs frozen CLIP's: "
             f"{float((real * torch.cat(frozen_features)).sum(-1).mean()):.4f}); class features moved "
             f"{float((t_real - t_shuffled).norm(dim=-1).mean() / t_real.norm(dim=-1).mean()):.4f} of their norm"]
    for j in sorted(norms):
        s, g, q, v = torch.stack(norms[j]).mean(0).tolist()
        own, other = torch.cat(vcps[j][0::2]), torch.cat(vcps[j][1::2])
        moved = float((own - other).norm(dim=-1).mean() / own.norm(dim=-1).mean())
        lines.append(f"  vision layer {j}: |projected SCP| {s:.2f}  |grounding update| {g:.2f}  |VCP queries| {q:.2f}"
                     f"  |gate x guidance| {v:.2f}  VCP moved by shuffling {moved:.4f} of their norm")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="base", choices=("base", "novel", "all"))
    args = ap.parse_args()
    torch.manual_seed(0)
    for run in args.runs:
        print("\n".join(reach(run, args.split, torch.device("cpu"))))


if __name__ == "__main__":
    main()
