"""Per-image conditions, by name: where the tensors a method `reads` come from.

A method declares `reads = ("scp",)`; for a list of images the runner builds one source per name
here, and each batch's conditions (a dict of tensors) are passed to the method as keyword
arguments. A new kind of condition is one more entry in `SOURCES`.

- "scp": the stage-one SCP tensors of each image (K x D phrase features and the K-slot mask),
  read from the Parquet cache made for this run's CLIP (and the MLLM / prompt version training
  used, when evaluating).

Controls (`conditions.scp` in the run's config), so that a claim about what SCP adds can fail:
`shuffled` gives every image the SCP of another image of the same list (a random single cycle
seeded by the run's seed: no image keeps its own, and the set of descriptions is unchanged),
`zeros` replaces every phrase feature by zeros (the mask is kept). Training and evaluation of a
run apply the same control, each to its own list of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import Field

from mugcp.core.coop_datasets import Item
from mugcp.core.defaults import SCP_SOURCES
from mugcp.core.errors import UserError
from mugcp.core.scp_cache import read_scp
from mugcp.core.settings import Settings


class ConditionsConfig(Settings):
    """Where a method's per-image conditions come from (a config section of methods that read any)."""

    scp: Literal[SCP_SOURCES] = Field(
        "real", description="SCP as extracted (real), or a control: another image's SCP (shuffled), or zeros")
    prompt: Optional[str] = Field(None, description="which stage-one prompt's SCP to read (its version, e.g. "
                                                    "scp-v1, or its name), where the cache holds several")
    k: Optional[int] = Field(None, ge=1, description="which stage-one k's SCP to read, where the cache holds several")


@dataclass
class ConditionContext:
    """What a source needs to find its tensors: the run's dataset, CLIP and cache."""

    dataset: str
    clip_model_id: str
    cache_dir: str
    mllm: Optional[str]
    prompt_version: Optional[str]
    device: torch.device
    extract_hint: str  # options that `mugcp extract` needs to fill a gap, for error messages
    scp: str = "real"  # ConditionsConfig.scp
    seed: int = 0  # the run's seed (draws the shuffled control's permutation)
    data_folder: Optional[Path] = None  # where the images are: their SCP is refused once their bytes changed
    k: Optional[int] = None  # the stage-one k to read (None: the only one the cache holds)


def single_cycle(n: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) with no fixed point (one random cycle), for n > 1."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


class ScpSource:
    """The stage-one SCP tensors of a list of images, fetched per batch by index."""

    def __init__(self, ctx: ConditionContext, items: list[Item]):
        found = read_scp(ctx.cache_dir, ctx.dataset, ctx.clip_model_id, [i.path for i in items], mllm=ctx.mllm,
                         prompt_version=ctx.prompt_version, hint=ctx.extract_hint, data_folder=ctx.data_folder,
                         k=ctx.k)
        self.scp, self.mask = torch.from_numpy(found.scp.copy()), torch.from_numpy(found.mask)
        if ctx.scp == "shuffled" and len(items) < 2:
            raise UserError(f"the shuffled SCP control gives each image another image's SCP, but the {ctx.dataset} "
                            f"images read here are {len(items)}: use real or zeros SCP, or more images")
        if ctx.scp == "shuffled":
            perm = single_cycle(len(items), ctx.seed)
            self.scp, self.mask = self.scp[perm], self.mask[perm]
        elif ctx.scp == "zeros":
            self.scp = torch.zeros_like(self.scp)
        self.provenance = {**{key: found.meta.get(key) for key in ("mllm", "prompt_version", "prompt", "k")},
                           "table": str(found.folder)}
        self.device = ctx.device

    def __call__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scp": self.scp[index].to(self.device).float(), "scp_mask": self.mask[index].to(self.device)}


SOURCES: dict[str, Callable[[ConditionContext, list[Item]], Callable]] = {"scp": ScpSource}


class Conditions:
    """The sources of every condition a method reads, for one list of images."""

    def __init__(self, names: tuple[str, ...], ctx: ConditionContext, items: list[Item]):
        self.sources = {name: SOURCES[name](ctx, items) for name in names}

    def __call__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for source in self.sources.values():
            out.update(source(index))
        return out

    def provenance(self) -> dict:
        """Where the conditions came from (recorded in run.json, so evaluation reads the same source)."""
        return {name: getattr(s, "provenance", None) for name, s in self.sources.items()}
