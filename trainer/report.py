"""`mugcp report`: the papers' tables from results JSONs, one per setting present, with their figures.

- **Base-to-novel**: Base / Novel / HM per dataset and method, and the eleven-dataset average.
- **Few-shot learning**: accuracy on all classes per shot count, per dataset; the curve (accuracy vs
  shots, one line per method, zero-shot CLIP as a dashed line), as CoOp's paper draws it.
- **Cross-dataset transfer**: accuracy on the source (ImageNet) and on each of the ten targets with
  the same prompts, and the target average.
- **Domain generalisation**: the source and ImageNet-V2, -Sketch, -A, -R, and the target average.

Accuracies are mean ± std over seeds (std with ddof=0, as CoOp's `parse_test_res.py`); HM is computed
from the seed-averaged Base and Novel, never as a mean of per-seed HMs; averages over datasets are
of seed means. Every missing or unfinished piece is listed rather than silently dropped.

Base-to-novel runs of one method whose `method:` or `conditions:` settings differ from the
method's defaults (an ablation such as `method.amg=false`, a control such as
`conditions.scp=shuffled`) are variants: they get their own rows, labelled by what differs
(`optim:` changes make no variant), and an ablation table sets each against the default variant
of its method, with the seeds' spread next to every value.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl

from mugcp.core.coop_datasets import BASE_TO_NOVEL, DOMAIN_TARGETS
from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic
from mugcp.core.protocol import SEEDS, harmonic_mean
from mugcp.trainer.config import protocol_defaults

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

SETTINGS = ("b2n", "fewshot", "xd", "dg")
TITLES = {"b2n": "Base-to-novel generalisation", "fewshot": "Few-shot learning (all classes)",
          "xd": "Cross-dataset transfer", "dg": "Domain generalisation"}

# Published 11-dataset averages (ViT-B/16, 16 shots, base-to-novel: Base / Novel / HM), for comparison.
# Sources: the "PromptSRC in comparison with existing state-of-the-art" table of muzairkhattak/PromptSRC's
# README (CLIP, CoOp, CoCoOp, MaPLe, PromptSRC; MaPLe's row as muzairkhattak/multimodal-prompt-learning's
# README gives it) and htyao89/KgCoOp's readme.md (KgCoOp: 80.73 / 73.6 / 77.0).
PUBLISHED = {"CLIP": (69.34, 74.22, 71.70), "CoOp": (82.69, 63.22, 71.66), "CoCoOp": (80.47, 71.69, 75.83),
             "KgCoOp": (80.73, 73.60, 77.00), "MaPLe": (82.28, 75.14, 78.55), "PromptSRC": (84.26, 76.10, 79.97)}

# Published transfer results (ViT-B/16, prompts learned on 16-shot ImageNet, 3 seeds): accuracy per dataset and the
# target average, keyed as the report's columns; the sources' columns are in the papers' order, as BASE_TO_NOVEL's
# and ["imagenet"] + DOMAIN_TARGETS are. Sources: xd, the "Cross-Dataset Evaluation" table of Vill-Lab/2024-AAAI-HPT's
# README.md (CoCoOp, MaPLe; its first row is left out: it is labelled CLIP but holds CoOp's numbers, 71.51 on
# ImageNet, where the same README's DG table gives CLIP 66.73) and the target averages alone of the "ProText performs
# favourably well in Cross-dataset benchmark" table of muzairkhattak/ProText's README.md (CLIP, CoOp, PromptSRC);
# dg, the "Domain Generalization" table of Vill-Lab/2024-AAAI-HPT's README.md. KgCoOp: no source gives these.
_XD, _DG = BASE_TO_NOVEL + ["average"], ["imagenet"] + DOMAIN_TARGETS + ["average"]
PUBLISHED_TRANSFER = {
    "xd": {"CLIP": {"average": 65.15}, "CoOp": {"average": 63.88},
           "CoCoOp": dict(zip(_XD, (71.02, 94.43, 90.14, 65.32, 71.88, 86.06, 22.94, 67.36, 45.73, 45.37, 68.21,
                                    65.74))),
           "MaPLe": dict(zip(_XD, (70.72, 93.53, 90.49, 65.57, 72.23, 86.20, 24.74, 67.01, 46.49, 48.06, 68.69,
                                   66.30))),
           "PromptSRC": {"average": 65.81}},
    "dg": {"CLIP": dict(zip(_DG, (66.73, 60.83, 46.15, 47.77, 73.96, 57.17))),
           "CoOp": dict(zip(_DG, (71.51, 64.20, 47.99, 49.71, 75.21, 59.28))),
           "CoCoOp": dict(zip(_DG, (71.02, 64.07, 48.75, 50.63, 76.18, 59.90))),
           "MaPLe": dict(zip(_DG, (70.72, 64.07, 49.15, 50.90, 76.98, 60.26)))}}
PUBLISHED_TRANSFER_SOURCES = {"xd": "Vill-Lab/2024-AAAI-HPT README; averages of CLIP, CoOp, PromptSRC: "
                                    "muzairkhattak/ProText README", "dg": "Vill-Lab/2024-AAAI-HPT README"}


VARIANT_SECTIONS = ("method", "conditions")  # config sections whose changes make a variant


def variant_of(method: str, config: dict | None, protocol: str = "b2n", dataset: str = "", shots: int = 16) -> str:
    """What a run's config changes against its method's defaults for its protocol (the reference's config for
    that setting), e.g. "conditions.scp=shuffled"; "" for nothing."""
    if not config:
        return ""
    try:
        reference = protocol_defaults(method, protocol, dataset, shots)
    except UserError:  # a method this installation does not know: nothing to compare with
        return ""
    changed = [f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
               for section in VARIANT_SECTIONS for key, value in sorted((config.get(section) or {}).items())
               if key in reference.get(section, {}) and reference[section][key] != value]
    return ", ".join(changed)


def label(method: str, variant: str) -> str:
    return f"{method} [{variant}]" if variant else method


def protocol_of(record: dict) -> str:
    """The protocol whose reference config a run (run.json) or a results record was trained under."""
    if record.get("protocol") or record.get("setting") in ("xd", "dg", "transfer"):
        return "transfer"
    setting = record.get("setting")
    return setting or ("b2n" if record.get("subsample", "base") == "base" else "fewshot")


def setting_of(record: dict) -> str:
    """The table a results record belongs to (zero-shot CLIP rows join every table they fit)."""
    if record.get("setting"):
        return record["setting"]
    return "b2n" if record.get("subsample", "base") == "base" or record["method"] == "zeroshot" else "fewshot"


def collect(runs_dir: Path) -> tuple[pl.DataFrame, list[str]]:
    """One row per results JSON (setting, source, dataset, method, variant, split, shots, seed, accuracy), and problems."""
    problems, rows = [], []
    for run_json in sorted(runs_dir.rglob("run.json")):
        run = json.loads(run_json.read_text())
        if not (run_json.parent / "prompt.safetensors").is_file():
            name = label(run.get("method"), variant_of(run.get("method"), run.get("config"), protocol_of(run),
                                                       run.get("dataset", ""), int(run.get("shots") or 16)))
            problems.append(f"{run.get('dataset')} {name} seed {run.get('seed')}: training not finished "
                            f"({run_json.parent})")
    for path in sorted(runs_dir.rglob("results_*.json")):
        r = json.loads(path.read_text())
        rows.append({"setting": setting_of(r), "source": r.get("source") or r["dataset"], "dataset": r["dataset"],
                     "method": r["method"],
                     "variant": variant_of(r["method"], r.get("config"), protocol_of(r), r.get("source") or r["dataset"],
                                           int(r.get("shots") or 16)),
                     "split": r["split"], "shots": int(r.get("shots") or 0), "seed": int(r["seed"]),
                     "accuracy": float(r["accuracy"])})
    schema = {"setting": pl.String, "source": pl.String, "dataset": pl.String, "method": pl.String,
              "variant": pl.String, "split": pl.String, "shots": pl.Int64, "seed": pl.Int64, "accuracy": pl.Float64}
    return pl.DataFrame(rows, schema=schema), problems


def _cells(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Mean, std (ddof 0) and seed count of accuracy per `keys`."""
    return df.group_by(keys, maintain_order=True).agg(
        pl.col("accuracy").mean().alias("mean"), pl.col("accuracy").std(ddof=0).alias("std"),
        pl.col("seed").n_unique().alias("seeds")).sort(keys)


def _labelled(df: pl.DataFrame) -> pl.DataFrame:
    """`method` as its label ("mugcp [method.amg=false]" for a variant), for the tables that key on it alone."""
    return df.with_columns(pl.when(pl.col("variant") == "").then(pl.col("method"))
                           .otherwise(pl.format("{} [{}]", "method", "variant")).alias("method"))


def _fmt(mean, std=None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def b2n_table(df: pl.DataFrame, problems: list[str]) -> tuple[list[dict], list[str]]:
    """Rows (dataset, method, variant, base/novel mean and std, HM, seeds); incomplete seeds are listed in problems."""
    b2n = df.filter(pl.col("setting").is_in(["b2n", "zeroshot"]) & pl.col("split").is_in(["base", "novel"]))
    rows = []
    for (dataset, method, variant), group in b2n.group_by(["dataset", "method", "variant"], maintain_order=True):
        name = label(method, variant)
        per_seed = group.pivot(on="split", index="seed", values="accuracy", aggregate_function="first")
        for split in ("base", "novel"):
            if split not in per_seed.columns:
                per_seed = per_seed.with_columns(pl.lit(None, pl.Float64).alias(split))
        for seed, base, novel in per_seed.select("seed", "base", "novel").iter_rows():
            if base is None or novel is None:
                missing = "novel" if novel is None else "base"
                problems.append(f"{dataset} {name} seed {seed}: no {missing} result (run `mugcp eval --split "
                                f"{missing}`)")
        if method != "zeroshot":
            problems += [f"{dataset} {name} seed {s}: missing" for s in SEEDS if s not in per_seed["seed"]]
        done = per_seed.drop_nulls(["base", "novel"])
        if done.height:
            b, n = done["base"].mean(), done["novel"].mean()
            rows.append({"dataset": dataset, "method": method, "variant": variant, "seeds": done.height, "base": b,
                         "base_std": done["base"].std(ddof=0), "novel": n, "novel_std": done["novel"].std(ddof=0),
                         "hm": harmonic_mean(b, n)})
    rows.sort(key=lambda r: (r["dataset"], r["method"], r["variant"]))
    for method, variant in sorted({(r["method"], r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["method"], r["variant"]) == (method, variant) and r["dataset"] in BASE_TO_NOVEL]
        if mine:
            b, n = float(np.mean([r["base"] for r in mine])), float(np.mean([r["novel"] for r in mine]))
            have = {r["dataset"] for r in mine}
            name = "average" if have == set(BASE_TO_NOVEL) else f"average ({len(have)}/11)"
            rows.append({"dataset": name, "method": method, "variant": variant, "seeds": None, "base": b,
                         "base_std": None, "novel": n, "novel_std": None, "hm": harmonic_mean(b, n)})
    return rows, problems


def build_table(runs_dir: Path) -> tuple[list[dict], list[str]]:
    """The base-to-novel rows and the list of missing pieces."""
    df, problems = collect(Path(runs_dir))
    return b2n_table(df, problems)


def ablation_rows(rows: list[dict]) -> list[dict]:
    """Every variant set against its method's default variant on the same dataset (differences of seed means)."""
    default = {(r["dataset"], r["method"]): r for r in rows if not r["variant"]}
    out = []
    for r in rows:
        ref = default.get((r["dataset"], r["method"]))
        if r["variant"] and ref is not None:
            out.append({**r, "d_base": r["base"] - ref["base"], "d_novel": r["novel"] - ref["novel"],
                        "d_hm": r["hm"] - ref["hm"]})
    return out


def ablation_markdown(rows: list[dict]) -> list[str]:
    """The ablation table's lines ([] when no run is a variant)."""
    ablations = ablation_rows(rows)
    if not ablations:
        return []
    out = ["Ablations and controls (differences of seed means against the method's defaults; ± is the seeds' std):",
           "", "| Dataset | Method | Variant | Seeds | Base | Novel | HM | Δ Base | Δ Novel | Δ HM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['dataset']} | {r['method']} | {r['variant']} | {r['seeds'] or ''} | "
            f"{_fmt(r['base'], r['base_std'])} | {_fmt(r['novel'], r['novel_std'])} | {r['hm']:.2f} | "
            f"{r['d_base']:+.2f} | {r['d_novel']:+.2f} | {r['d_hm']:+.2f} |" for r in ablations]
    return out


def b2n_markdown(rows: list[dict]) -> list[str]:
    out = ["| Dataset | Method | Seeds | Base | Novel | HM |", "|---|---|---|---|---|---|"]
    out += [f"| {r['dataset']} | {label(r['method'], r['variant'])} | {r['seeds'] or ''} | {_fmt(r['base'], r['base_std'])} | "
            f"{_fmt(r['novel'], r['novel_std'])} | {r['hm']:.2f} |" for r in rows]
    out += ["", "Published 11-dataset averages (ViT-B/16, 16 shots):", "", "| Method | Base | Novel | HM |",
            "|---|---|---|---|"]
    out += [f"| {m} | {b:.2f} | {n:.2f} | {h:.2f} |" for m, (b, n, h) in PUBLISHED.items()]
    ablations = ablation_markdown(rows)
    return out + ([""] + ablations if ablations else [])


def fewshot_tables(df: pl.DataFrame) -> tuple[dict, list[str]]:
    """{dataset: {method: {shots: (mean, std)}}} (zero-shot CLIP under shots 0) and the Markdown."""
    df = _labelled(df)
    few = df.filter((pl.col("setting") == "fewshot") & (pl.col("dataset") == pl.col("source")))
    zero = df.filter((pl.col("method") == "zeroshot") & (pl.col("split") == "all"))
    curves: dict = {}
    for row in _cells(pl.concat([few, zero]), ["dataset", "method", "shots"]).iter_rows(named=True):
        if row["dataset"] in set(few["dataset"]):
            curves.setdefault(row["dataset"], {}).setdefault(row["method"], {})[row["shots"]] = (row["mean"], row["std"])
    out = []
    for dataset, methods in sorted(curves.items()):
        shots = sorted({s for m in methods.values() for s in m if s})
        out += [f"**{dataset}**", "", "| Method | " + " | ".join(f"{s} shot{'s' * (s > 1)}" for s in shots) + " |",
                "|---|" + "---|" * len(shots)]
        for method, points in sorted(methods.items()):
            if method == "zeroshot":
                out.append(f"| zeroshot | {_fmt(points.get(0, (None,))[0])} (no training) |" + " |" * (len(shots) - 1))
            else:
                out.append(f"| {method} | " + " | ".join(_fmt(*points[s]) if s in points else "-" for s in shots) + " |")
        out.append("")
    return curves, out


def transfer_table(df: pl.DataFrame, setting: str) -> tuple[list[dict], list[str]]:
    """Rows: method, the source's accuracy and each target's (mean ± std over seeds), target average."""
    df = _labelled(df).filter(pl.col("split") == "all")
    on_targets = df.filter(pl.col("setting") == setting)
    targets, sources = sorted(set(on_targets["dataset"])), sorted(set(on_targets["source"]))
    if not targets:
        return [], []
    columns = sources + targets
    # the source column: the source runs' own test ("transfer", or the few-shot run they share), same shots
    own = df.filter(pl.col("setting").is_in(["transfer", "fewshot"]) & pl.col("dataset").is_in(sources)
                    & pl.col("shots").is_in(sorted(set(on_targets["shots"]))))
    apart = set(own.filter(pl.col("setting") == "transfer")["method"])
    own = own.filter((pl.col("setting") == "transfer") | ~pl.col("method").is_in(sorted(apart)))
    zero = df.filter(pl.col("method") == "zeroshot")
    cells = _cells(pl.concat([on_targets, own, zero]), ["method", "dataset"])
    rows = []
    for method in sorted(set(cells["method"])):
        mine = {r["dataset"]: (r["mean"], r["std"]) for r in cells.filter(pl.col("method") == method).iter_rows(named=True)}
        have = [mine[t][0] for t in targets if t in mine]
        rows.append({"method": method, **{c: mine.get(c) for c in columns},
                     "average": float(np.mean(have)) if len(have) == len(targets) else None})
    out = ["| Method | " + " | ".join(f"{c} (source)" if c in sources else c for c in columns) + " | Average |",
           "|---|" + "---|" * (len(columns) + 1)]
    out += [f"| {r['method']} | " + " | ".join(_fmt(*r[c]) if r[c] else "-" for c in columns) +
            f" | {_fmt(r['average'])} |" for r in rows]
    return rows, out + published_transfer_markdown(setting, sources, targets)


def published_transfer_markdown(setting: str, sources: list[str], targets: list[str]) -> list[str]:
    """The published rows of `setting` in the report's columns ("-" where a source gives none); [] unless from ImageNet."""
    if sources != ["imagenet"]:
        return []
    columns, n = sources + targets, len(_XD if setting == "xd" else _DG) - 2  # n: neither source nor average
    out = ["", f"Published (ViT-B/16, 16 shots, source: {PUBLISHED_TRANSFER_SOURCES[setting]}):", "",
           "| Method | " + " | ".join(f"{c} (source)" if c in sources else c for c in columns) +
           f" | Average ({n} targets) |", "|---|" + "---|" * (len(columns) + 1)]
    return out + [f"| {m} | " + " | ".join(_fmt(row.get(c)) for c in columns) + f" | {_fmt(row.get('average'))} |"
                  for m, row in PUBLISHED_TRANSFER[setting].items()]


def plot_b2n(rows: list[dict], ax_grid) -> None:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for ax, dataset in zip(ax_grid, datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r["base"] for r in mine], 0.4, yerr=[r["base_std"] or 0 for r in mine], label="base")
        ax.bar(x + 0.2, [r["novel"] for r in mine], 0.4, yerr=[r["novel_std"] or 0 for r in mine], label="novel")
        ax.set_xticks(x, [label(r["method"], r["variant"]) for r in mine], rotation=30, ha="right")
        ax.set_title(f"{dataset} (base-to-novel)")
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)


def plot_fewshot(curves: dict, ax_grid) -> None:
    for ax, (dataset, methods) in zip(ax_grid, sorted(curves.items())):
        for method, points in sorted(methods.items()):
            if method == "zeroshot":
                ax.axhline(points.get(0, (np.nan,))[0], ls="--", c="grey", label="zero-shot CLIP")
                continue
            shots = sorted(s for s in points if s)
            ax.errorbar(shots, [points[s][0] for s in shots], yerr=[points[s][1] or 0 for s in shots], marker="o",
                        label=method, capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset} (few-shot)")
        ax.legend(fontsize=7)


def plot_transfer(rows: list[dict], setting: str, ax) -> None:
    columns = [c for c in rows[0] if c not in ("method", "average")]
    x = np.arange(len(columns))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r[c][0] if r[c] else 0 for c in columns], width, label=r["method"])
    ax.set_xticks(x + 0.4 - width / 2, columns, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(TITLES[setting])
    ax.legend(fontsize=7)


def write_report(runs_dir: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """Write report.md, report.csv and report.png (default: into RUNS_DIR); return the Markdown and paths."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"runs folder not found: {runs_dir}")
    df, problems = collect(runs_dir)
    if df.is_empty() and not problems:
        raise UserError(f"no results under {runs_dir}: run `mugcp train` and `mugcp eval` (or `mugcp sweep`) first")
    b2n_rows, problems = b2n_table(df, problems)
    curves, fewshot_md = fewshot_tables(df)
    transfers = {s: transfer_table(df, s) for s in ("xd", "dg")}
    md = []
    if b2n_rows:
        md += [f"## {TITLES['b2n']}", ""] + b2n_markdown(b2n_rows) + [""]
    if curves:
        md += [f"## {TITLES['fewshot']}", ""] + fewshot_md
    for setting, (rows, lines) in transfers.items():
        if rows:
            md += [f"## {TITLES[setting]}", ""] + lines + [""]
    if problems:
        md += ["Missing or incomplete:", ""] + [f"- {p}" for p in problems]
    md = "\n".join(md) + "\n"
    out = Path(out or runs_dir)
    paths = [out / "report.md"]
    write_bytes_atomic(paths[0], md.encode())
    tables = {"b2n": pl.DataFrame(b2n_rows) if b2n_rows else None,
              "fewshot": pl.DataFrame([{"dataset": d, "method": m, "shots": s, "mean": v[0], "std": v[1]}
                                       for d, ms in curves.items() for m, pts in ms.items() for s, v in pts.items()])
              if curves else None}
    tables.update({s: pl.DataFrame([{k: (v[0] if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows])
                   for s, (rows, _) in transfers.items() if rows})
    for setting, table in tables.items():
        if table is not None:
            paths.append(out / f"report_{setting}.csv")
            write_bytes_atomic(paths[-1], table.write_csv(float_precision=4).encode())
    panels = len(dict.fromkeys(r["dataset"] for r in b2n_rows)) + len(curves) + sum(1 for r, _ in transfers.values()
                                                                                   if r)
    if panels:
        cols = min(3, panels)
        fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(5 * cols, 3.6 * -(-panels // cols)),
                                 squeeze=False)
        grid = list(axes.flat)
        n_b2n = len(dict.fromkeys(r["dataset"] for r in b2n_rows))
        plot_b2n(b2n_rows, grid[:n_b2n])
        plot_fewshot(curves, grid[n_b2n:n_b2n + len(curves)])
        rest = grid[n_b2n + len(curves):]
        for setting, (rows, _) in transfers.items():
            if rows:
                plot_transfer(rows, setting, rest.pop(0))
        for ax in rest:
            ax.axis("off")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        paths.append(out / "report.png")
        write_bytes_atomic(paths[-1], buf.getvalue())
    return md, paths

