"""`mugcp report`: a paper-style Base / Novel / HM table over datasets x methods from results JSONs.

Base and Novel are mean ± std over seeds (std with ddof=0, as CoOp's `parse_test_res.py`); HM is
computed from the seed-averaged Base and Novel, never as a mean of per-seed HMs. The average
row averages each method over the eleven base-to-novel datasets it has; a method missing some
is marked, and every missing or incomplete run is listed rather than silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

from mugcp.core.coop_datasets import BASE_TO_NOVEL
from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic
from mugcp.core.protocol import SEEDS, harmonic_mean

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# Published 11-dataset averages (ViT-B/16, 16 shots, base-to-novel: Base / Novel / HM), for comparison.
# Sources: the "PromptSRC in comparison with existing state-of-the-art" table of muzairkhattak/PromptSRC's
# README (CLIP, CoOp, CoCoOp, MaPLe, PromptSRC; MaPLe's row as muzairkhattak/multimodal-prompt-learning's
# README gives it) and htyao89/KgCoOp's readme.md (KgCoOp: 80.73 / 73.6 / 77.0).
PUBLISHED = {"CLIP": (69.34, 74.22, 71.70), "CoOp": (82.69, 63.22, 71.66), "CoCoOp": (80.47, 71.69, 75.83),
             "KgCoOp": (80.73, 73.60, 77.00), "MaPLe": (82.28, 75.14, 78.55), "PromptSRC": (84.26, 76.10, 79.97)}


@dataclass
class Cell:
    base: list[float]
    novel: list[float]

    @property
    def hm(self) -> float:
        return harmonic_mean(float(np.mean(self.base)), float(np.mean(self.novel)))


def collect(runs_dir: Path) -> tuple[dict, list[str]]:
    """{(dataset, method): {seed: {split: accuracy}}} of base-to-novel runs, and the problems found."""
    found: dict = defaultdict(lambda: defaultdict(dict))
    problems = []
    for run_json in sorted(runs_dir.rglob("run.json")):
        run = json.loads(run_json.read_text())
        if run.get("subsample") != "base":
            continue
        if not (run_json.parent / "prompt.safetensors").is_file():
            problems.append(f"{run['dataset']} {run['method']} seed {run['seed']}: training not finished "
                            f"({run_json.parent})")
    for path in sorted(runs_dir.rglob("results_*.json")):
        r = json.loads(path.read_text())
        if r.get("split") not in ("base", "novel"):
            continue
        if r["method"] != "zeroshot" and r.get("subsample", "base") != "base":
            continue
        found[(r["dataset"], r["method"])][r["seed"]][r["split"]] = r["accuracy"]
    return found, problems


def build_table(runs_dir: Path) -> tuple[list[dict], list[str]]:
    """Rows (dataset, method, base/novel mean and std, HM, seeds) and the list of missing pieces."""
    found, problems = collect(runs_dir)
    if not found and not problems:
        raise UserError(f"no base/novel results under {runs_dir}: run `mugcp train` and `mugcp eval --split base` "
                        f"and `--split novel` first")
    rows = []
    methods = sorted({m for _, m in found})
    for (dataset, method), seeds in sorted(found.items()):
        complete = {s: v for s, v in seeds.items() if "base" in v and "novel" in v}
        for s, v in seeds.items():
            if s not in complete:
                missing = "novel" if "base" in v else "base"
                problems.append(f"{dataset} {method} seed {s}: no {missing} result (run `mugcp eval --split {missing}`)")
        if method != "zeroshot":
            for s in SEEDS:
                if s not in seeds:
                    problems.append(f"{dataset} {method} seed {s}: missing")
        if not complete:
            continue
        cell = Cell([v["base"] for v in complete.values()], [v["novel"] for v in complete.values()])
        rows.append({"dataset": dataset, "method": method, "seeds": len(complete),
                     "base": float(np.mean(cell.base)), "base_std": float(np.std(cell.base)),
                     "novel": float(np.mean(cell.novel)), "novel_std": float(np.std(cell.novel)), "hm": cell.hm})
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r["dataset"] in BASE_TO_NOVEL]
        if not mine:
            continue
        b, n = float(np.mean([r["base"] for r in mine])), float(np.mean([r["novel"] for r in mine]))
        have = {r["dataset"] for r in mine}
        label = "average" if have == set(BASE_TO_NOVEL) else f"average ({len(have)}/11)"
        rows.append({"dataset": label, "method": method, "seeds": None, "base": b, "base_std": None,
                     "novel": n, "novel_std": None, "hm": harmonic_mean(b, n)})
    return rows, problems


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def to_markdown(rows: list[dict], problems: list[str]) -> str:
    out = ["| Dataset | Method | Seeds | Base | Novel | HM |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['method']} | {r['seeds'] or ''} | {_fmt(r['base'], r['base_std'])} | "
                   f"{_fmt(r['novel'], r['novel_std'])} | {r['hm']:.2f} |")
    out += ["", "Published 11-dataset averages (ViT-B/16, 16 shots):", "", "| Method | Base | Novel | HM |",
            "|---|---|---|---|"]
    out += [f"| {m} | {b:.2f} | {n:.2f} | {h:.2f} |" for m, (b, n, h) in PUBLISHED.items()]
    if problems:
        out += ["", "Missing or incomplete:", ""] + [f"- {p}" for p in problems]
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["dataset", "method", "seeds", "base", "base_std", "novel", "novel_std",
                                             "hm"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def plot(rows: list[dict]) -> bytes:
    """Grouped bars: base and novel accuracy per method, one panel per dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    cols = min(4, len(datasets))
    nrows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r["base"] for r in mine], 0.4, yerr=[r["base_std"] or 0 for r in mine], label="base")
        ax.bar(x + 0.2, [r["novel"] for r in mine], 0.4, yerr=[r["novel_std"] or 0 for r in mine], label="novel")
        ax.set_xticks(x, [r["method"] for r in mine], rotation=30, ha="right")
        ax.set_title(dataset)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(runs_dir: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """Write report.md, report.csv and report.png (default: into RUNS_DIR); return the Markdown and paths."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"runs folder not found: {runs_dir}")
    rows, problems = build_table(runs_dir)
    out = Path(out or runs_dir)
    md = to_markdown(rows, problems)
    paths = [out / "report.md", out / "report.csv", out / "report.png"]
    write_bytes_atomic(paths[0], md.encode())
    write_bytes_atomic(paths[1], to_csv(rows).encode())
    if rows:
        write_bytes_atomic(paths[2], plot(rows))
    else:
        paths.pop()
    return md, paths
