"""Training and eval throughput and peak memory per method, at 47 and 1,000 classes.

    python bench/train.py [--clip ViT-B-16] [--pretrained none] [--classes 47,1000] [--batch-size 4]
                          [--methods coop,cocoop,maple,kgcoop,promptsrc,gpt,mugcp,mugcp-input] [--steps 3] [--device cpu]
    python bench/train.py --cocoop-loop      # CoCoOp: batched instance prompts vs a per-image loop

Each configuration runs in its own process, so peak memory (GPU: max allocated; CPU: max RSS)
is its own. Random weights and random images: the speed of the architecture, not of a checkpoint.
Train images/s = batch / median step time over `--steps` timed steps after one warm-up step; the
first step's time is shown apart (it holds one-time work, e.g. PromptSRC's 60-template text features).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def one(args) -> dict:
    """Measure one (method, classes) configuration in this process."""
    import torch

    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.config import load_config
    from mugcp.trainer.methods import build_method
    from mugcp.trainer.methods.base import TrainingShots

    device = torch.device(args.device)
    clip = load_clip(args.clip, args.pretrained, device)
    method, fusion = (args.method.split("-") + [None])[:2]
    cfg = load_config(method, None, [f"method.fusion={fusion}"] if fusion else []).method
    names = [f"class number {i}" for i in range(args.n_classes)]
    torch.manual_seed(0)
    model = build_method(method, clip, names, "imagenet", cfg).to(device)
    features = torch.randn(2 * args.n_classes, clip.embed_dim, device=device)
    model.on_train_start(TrainingShots([], torch.arange(args.n_classes, device=device).repeat(2), names,
                                       lambda: features))
    b = args.batch_size
    images = torch.randn(b, 3, clip.image_size, clip.image_size, device=device)
    labels = torch.randint(0, args.n_classes, (b,), device=device)
    extra = {}
    if "scp" in model.reads:
        extra = {"scp": torch.nn.functional.normalize(torch.randn(b, 8, clip.embed_dim, device=device), dim=-1),
                 "scp_mask": torch.ones(b, 8, dtype=torch.bool, device=device)}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for step in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, _ = model.loss(images, labels, **extra)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        times.append(time.perf_counter() - t0)
    model.eval()
    eval_b = args.eval_batch_size
    eval_images = torch.randn(eval_b, 3, clip.image_size, clip.image_size, device=device)
    eval_extra = {k: v[:1].expand(eval_b, *v.shape[1:]) for k, v in extra.items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        model(eval_images, **eval_extra)
        sync()
        t0 = time.perf_counter()
        model(eval_images, **eval_extra)
        sync()
        eval_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    first, step = times[0], statistics.median(times[1:])
    return {"method": args.method, "classes": args.n_classes, "batch": b, "step_s": step, "first_step_s": first,
            "train_images_per_s": b / step, "eval_images_per_s": eval_b / eval_s, "peak_gib": peak,
            "device": device_name(device), "clip": args.clip}


def cocoop_loop(args) -> None:
    """CoCoOp's instance-conditioned text pass, three ways, forward only.

    batched: mugcp's one pass over B x C prompts cut at the longest EOT; per-image loop: the same
    cut prompts, one pass per image; reference: one pass per image over full 77-token prompts, as
    CoCoOp's code does. The step's image pass is the same in all three and is left out.
    """
    import torch

    import mugcp.trainer.surgery as surgery
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.config import load_config
    from mugcp.trainer.methods.cocoop import CoCoOp

    device = torch.device(args.device)
    clip = load_clip(args.clip, args.pretrained, device)

    def timed(fn) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in [int(c) for c in args.classes.split(",")]:
        names = [f"class number {i}" for i in range(n)]
        torch.manual_seed(0)
        cfg = load_config("cocoop").method
        model = CoCoOp(clip, names, ("a photo of a {}.",), cfg).to(device)
        cut = surgery.cut_length
        surgery.cut_length = lambda tokens: tokens.shape[1]  # no EOT cut: 77 tokens
        try:
            full = CoCoOp(clip, names, ("a photo of a {}.",), cfg).to(device)
        finally:
            surgery.cut_length = cut
        full.load_state_dict(model.state_dict())
        torch.manual_seed(0)
        ctx = model.ctx[None, None] + 0.01 * torch.randn(args.batch_size, 1, *model.ctx.shape, device=device)
        amp = device.type == "cuda"
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = {
                "batched": timed(lambda: model.text(ctx)),
                "per-image loop": timed(lambda: [model.text(ctx[i:i + 1]) for i in range(len(ctx))]),
                "reference (per image, 77 tokens)": timed(lambda: [full.text(ctx[i:i + 1]) for i in range(len(ctx))]),
            }
        ref = out["reference (per image, 77 tokens)"]
        print(f"| {n} | {args.batch_size} | {model.text.tokens.shape[1]} | {out['batched']:.3f} | "
              f"{out['per-image loop']:.3f} | {ref:.3f} | {out['per-image loop'] / out['batched']:.2f}x | "
              f"{ref / out['batched']:.2f}x | {device_name(device)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--classes", default="47,1000")
    ap.add_argument("--methods", default="coop,cocoop,maple,kgcoop,promptsrc,gpt,mugcp,mugcp-input")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--cocoop-loop", action="store_true")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n-classes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cocoop_loop:
        print("| classes | batch | tokens | batched (s) | per-image loop (s) | reference loop, 77 tokens (s) "
              "| vs loop | vs reference | device |")
        print("|---|---|---|---|---|---|---|---|---|")
        return cocoop_loop(args)
    if args.method:  # child process: one configuration
        print(json.dumps(one(args)))
        return
    print("| method | classes | batch | train images/s | step (s) | first step (s) | eval images/s | peak memory (GiB) "
          "| device |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(c) for c in args.classes.split(",")]:
        for m in args.methods.split(","):
            cmd = [sys.executable, __file__, "--method", m, "--n-classes", str(n), "--clip", args.clip,
                   "--pretrained", args.pretrained, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--eval-batch-size", str(args.eval_batch_size), "--device", args.device]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                reason = (r.stderr.strip().splitlines() or ["?"])[-1][:80]
                print(f"| {m} | {n} | {args.batch_size} | failed: {reason} | | | | | |", flush=True)
                continue
            x = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {m} | {n} | {x['batch']} | {x['train_images_per_s']:.2f} | {x['step_s']:.2f} | "
                  f"{x['first_step_s']:.2f} | {x['eval_images_per_s']:.1f} | {x['peak_gib']:.2f} | {x['device']} |",
                  flush=True)


if __name__ == "__main__":
    main()
