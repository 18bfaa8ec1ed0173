"""`mugcp report`: the papers' tables from results JSONs, one per setting present, with their figures.

- **Base-to-novel**: Base / Novel / HM per dataset and method, and the eleven-dataset average.
- **Few-shot learning**: accuracy on all classes per shot count, per dataset; the curve (accuracy vs
  shots, one line per method, zero-shot CLIP as a dashed line), as CoOp's paper draws it.
- **Cross-dataset transfer**: accuracy on the source (ImageNet) and on each of the ten targets with
  the same prompts, and the target average.
- **Domain generalisation**: the source and ImageNet-V2, -Sketch, -A, -R, and the target average.

A cell holds one value per seed, from the results of its table's setting and split only (a few-shot
run's base and novel evaluations are not its all-classes accuracy). Accuracies are mean ± std over
seeds (std with ddof=0, as CoOp's `parse_test_res.py`), the mean alone from one seed; HM is computed
from the seed-averaged Base and Novel, never as a mean of per-seed HMs; averages over datasets are
of seed means. Every missing or unfinished piece is listed rather than silently dropped, and two
results that claim one cell are both listed and left out (the report cannot tell which one is right).

Runs are averaged only with runs of the same configuration: the same shots and the same config.
Runs of another CLIP, or reading SCP from another MLLM or prompt version, get rows of their own,
named by it where the report holds more than one. A run whose config differs from its method's
reference config for its setting gets a row of its own, labelled by what differs (`coop [2 shots,
optim.epochs=2]`; shots where the table has no column per shot count and they are not the
published rows' 16). `method:` and `conditions:`
changes (an ablation such as `method.amg=false`, a control such as `conditions.scp=shuffled`) are
its variant, `optim:` changes its schedule (a run imported from the reference code, `mugcp import`, has the
schedule "imported epoch N", N the epoch its checkpoint was saved at); the ablation table sets each base-to-novel variant
against the default variant of its method trained with the same shots and schedule, with the
seeds' spread next to every value.
"""

from __future__ import annotations

import functools
import io
import json
import shlex
import textwrap
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl

from mugcp.core.coop_datasets import BASE_TO_NOVEL, DOMAIN_TARGETS, TRANSFER_TARGETS
from mugcp.core.errors import UserError
from mugcp.core.files import walk_files, write_files_atomic
from mugcp.core.protocol import SEEDS, harmonic_mean
from mugcp.trainer.config import protocol_defaults
from mugcp.trainer.results import OWN_SPLITS, other_weights, readable_results, results_path, weights_digest
from mugcp.trainer.runs import FINAL_WEIGHTS

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


LEGEND = ("Mean ± std (ddof 0) over seeds; a value without ± is from one seed (or zero-shot CLIP, which has none). "
          "A row in brackets changes the method's reference config for its setting; rows are never averaged "
          "together.")
VARIANT_SECTIONS = ("method", "conditions")  # what an ablation or a control changes: the ablation table's rows
SCHEDULE_SECTIONS = ("optim",)  # how the prompts were trained: a row of its own too, but no ablation
STANDARD_SHOTS = 16  # the shots of the published b2n, xd and dg rows (the few-shot table has a column per count)
KEY = ["setting", "source", "dataset", "method", "variant", "schedule", "models", "shots", "split",
       "seed"]  # one value each


def variant_of(method: str, config: dict | None, protocol: str = "b2n", dataset: str = "", shots: int = 16,
               sections: tuple[str, ...] = VARIANT_SECTIONS) -> str:
    """What a run's config changes in `sections` against its method's defaults for its protocol (the reference's
    config for that setting and shots), e.g. "conditions.scp=shuffled"; "" for nothing."""
    if not config:
        return ""
    try:
        reference = _reference_config(method, protocol, dataset, shots)
    except UserError:  # a method this installation does not know: nothing to compare with
        return ""
    changed = [f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}"
               for section in sections for key, value in sorted((config.get(section) or {}).items())
               if key in reference.get(section, {}) and reference[section][key] != value
               and f"{section}.{key}" not in SELECTORS]
    return ", ".join(changed)


# Keys that choose which stage-one table a run reads, not how it learns: what it read names its row (`models_of`)
SELECTORS = ("conditions.prompt", "conditions.k")


@functools.lru_cache(maxsize=None)
def _reference_config(method: str, protocol: str, dataset: str, shots: int) -> dict:
    """`protocol_defaults`, merged once per (method, setting): a report reads thousands of records (read only)."""
    return protocol_defaults(method, protocol, dataset, shots)


def label(method: str, *changes: str) -> str:
    """A row's name: the method, and in brackets what its runs change ("" parts are left out)."""
    changed = ", ".join(c for c in changes if c)
    return f"{method} [{changed}]" if changed else method


def shots_note(shots: int | None) -> str:
    """The shots where a table without a column per shot count must say them (zero-shot: none)."""
    return f"{shots} shots" if shots and shots != STANDARD_SHOTS else ""


def row_label(row: dict, with_shots: bool = True) -> str:
    return label(row["method"], row.get("models", ""), shots_note(row["shots"]) if with_shots else "", row["variant"],
                 row["schedule"])


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


def configuration(record: dict, dataset: str) -> dict:
    """What makes runs comparable: method, shots, and what the config changes from the reference's (variant:
    method/conditions, schedule: optim). Runs that differ in any of these are never averaged together."""
    method, config, protocol, shots = record["method"], record.get("config"), protocol_of(record), record.get("shots")
    found = {name: variant_of(method, config, protocol, dataset, int(shots or 16), sections)
             for name, sections in (("variant", VARIANT_SECTIONS), ("schedule", SCHEDULE_SECTIONS))}
    if record.get("imported"):  # trained by the reference code (`mugcp import`), at the epoch its checkpoint names
        epoch = record["imported"].get("epoch")
        found["schedule"] = ", ".join(x for x in (found["schedule"], f"imported epoch {epoch}" if epoch else "imported")
                                      if x)
    tested = record.get("test_conditions")  # a test-time control (`mugcp eval --scp`) of a run trained otherwise
    if tested:
        found["variant"] = ", ".join(v for v in (found["variant"], *(f"test conditions.{k}={x}"
                                                                     for k, x in sorted(tested.items()))) if v)
    return {"method": method, "shots": int(shots or 0), **found}


def collect(runs_dir: Path) -> tuple[pl.DataFrame, list[str]]:
    """One row per results JSON (`KEY`, accuracy, path, run folder), and problems. Results that claim one `KEY`
    (a copied run folder, a run of another CLIP) are listed and left out: the report cannot tell which is right;
    so are results of weights a run folder no longer holds (trained or imported again since), and results on
    another split of a dataset than the others (`_one_split_per_dataset`)."""
    problems, rows = [], []
    runs = {}  # run folder -> (its run.json, its final weights' digest, its row's name)
    tree = list(walk_files(runs_dir))
    for folder, names in tree:
        if "run.json" in names:
            try:
                run = json.loads((folder / "run.json").read_text())
            except ValueError:
                run = None
            try:
                name = row_label(configuration(run, run.get("dataset", "")))
            except (AttributeError, KeyError, TypeError, ValueError, UserError):  # not JSON, or hand-edited
                problems.append(f"{folder / 'run.json'}: damaged, not a run record")
                continue
            runs[folder] = (run, weights_digest(folder), name)
    records, evaluated, stale = [], set(), set()
    for path in sorted(folder / n for folder, names in tree for n in names
                       if n.startswith("results_") and n.endswith(".json")):
        record = readable_results(path)
        if record is not None:
            try:  # what the tables read of it
                setting_of(record)
                configuration(record, record.get("source") or record["dataset"])
            except (KeyError, TypeError, ValueError, UserError):
                record = None
        if record is None:
            problems.append(f"{path}: damaged results file, left out (evaluate its run again)")
            continue
        changed = other_weights(record, *runs[path.parent][:2]) if path.parent in runs else []
        if changed:
            stale.add(path.parent)
            root = runs[path.parent][0].get("root")
            problems.append(f"{path}: measured on weights {path.parent} no longer holds ({'; '.join(changed)}), "
                            f"left out (run `{eval_command(path.parent, record, root)}` again)")
            continue
        if path in {results_path(path.parent, split) for split in OWN_SPLITS}:
            evaluated.add(path.parent)
        records.append((path, record))
    for folder, (run, _, name) in runs.items():
        finished = (folder / FINAL_WEIGHTS).is_file()
        if (finished and folder in evaluated) or folder in stale:
            continue
        problems.append(f"{run.get('dataset')} {name} seed {run.get('seed')}: " + (
            f"trained, never evaluated (run `mugcp eval --run {shlex.quote(str(folder))} --split ...`)" if finished
            else f"training not finished ({folder})"))
    records = _one_split_per_dataset(records, problems)
    used = [models_of(r) for _, r in records]
    # the CLIP and the SCP's MLLM / prompt version name a row only where the runs here use more than one
    clips, sources = len({clip for clip, _ in used}) > 1, len({scp for _, scp in used if scp}) > 1
    for (path, r), (clip, scp) in zip(records, used):
        models = ", ".join(n for n in (clip if clips else "", f"SCP {scp}" if sources and scp else "") if n)
        tested = ", ".join(f"{k}={x}" for k, x in sorted((r.get("test_conditions") or {}).items()))
        rows.append({"setting": setting_of(r), "source": r.get("source") or r["dataset"], "dataset": r["dataset"],
                     **configuration(r, r.get("source") or r["dataset"]), "models": models, "split": r["split"],
                     "seed": int(r["seed"]), "accuracy": float(r["accuracy"]), "tested": tested, "path": str(path),
                     "run": str(path.parent)})
    schema = {"setting": pl.String, "source": pl.String, "dataset": pl.String, "method": pl.String,
              "shots": pl.Int64, "variant": pl.String, "schedule": pl.String, "models": pl.String,
              "split": pl.String, "seed": pl.Int64, "accuracy": pl.Float64, "tested": pl.String, "path": pl.String,
              "run": pl.String}
    df = pl.DataFrame(rows, schema=schema)
    twice = df.filter(pl.len().over(KEY) > 1)
    for group in twice.partition_by(KEY, maintain_order=True):
        r = group.row(0, named=True)
        problems.append(f"{r['dataset']} {row_label(r)} seed {r['seed']} {r['split']} ({r['setting']}): "
                        f"{group.height} results of one configuration, none used: {', '.join(group['path'])}")
    return df.filter(pl.len().over(KEY) == 1), problems


def eval_command(run: Path, record: dict, root: str | None = None) -> str:
    """The `mugcp eval` that writes `record`'s results again for the run in `run` (`root`: the --root it was
    trained with, which another dataset's evaluation needs too: the papers' datasets share one $DATA)."""
    tested = (record.get("test_conditions") or {}).get("scp")
    other = record["dataset"] if record.get("source") not in (None, record["dataset"]) else None
    where = f" --root {shlex.quote(str(root))}" if root else " --root DATA"
    return (f"mugcp eval --run {shlex.quote(str(run))} --split {record['split']}" +
            (f" --dataset {other}{where}" if other else "") + (f" --scp {tested}" if tested else ""))


def _one_split_per_dataset(records: list[tuple[Path, dict]], problems: list[str]) -> list[tuple[Path, dict]]:
    """The records tested on the split of each dataset that most of its results here were tested on. Results on
    another split (images added to a folder whose split mugcp generated, another copy of the data) measure other
    images: averaged in, or set beside each other, they would compare nothing. The others are listed and left
    out; where two splits are tied, all of that dataset's are. Records of earlier versions (no digest) stay."""
    counts: dict[str, Counter] = {}
    for _, r in records:
        if r.get("split_digest"):
            counts.setdefault(r["dataset"], Counter())[r["split_digest"]] += 1
    kept = []
    for path, r in records:
        ranked = counts.get(r["dataset"], Counter()).most_common()
        digest = r.get("split_digest")
        if not digest or len(ranked) == 1 or (digest == ranked[0][0] and ranked[0][1] > ranked[1][1]):
            kept.append((path, r))
            continue
        split = ", ".join(f"{d[:12]} ({n} result{'s' * (n > 1)})" for d, n in ranked)
        problems.append(f"{path}: tested on split {digest[:12]} of {r['dataset']}, while results here were tested "
                        f"on the splits {split}: left out; evaluate every run on one copy of the data")
    return kept


def models_of(record: dict) -> tuple[str, str]:
    """(the CLIP a result was measured with, the stage-one source of the SCP it read or ""): runs of other CLIPs
    or other MLLMs are other rows, never averaged together."""
    scp = (record.get("conditions") or {}).get("scp") or {}
    source = "/".join(str(scp[k]) for k in ("mllm", "prompt_version") if scp.get(k)) + (
        f"/k{scp['k']}" if scp.get("k") else "")
    return str(record.get("clip") or record.get("model") or ""), source


def _cells(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Mean, std (ddof 0) and seed count of accuracy per `keys` (one row per seed there: `collect`'s `KEY`)."""
    return df.group_by(keys, maintain_order=True).agg(
        pl.col("accuracy").mean().alias("mean"), pl.col("accuracy").std(ddof=0).alias("std"),
        pl.col("seed").n_unique().alias("seeds")).sort(keys)


def _labelled(df: pl.DataFrame, with_shots: bool) -> pl.DataFrame:
    """`method` as its row label ("mugcp [method.amg=false]"), for the tables that key on it alone: grouping
    by it keeps every configuration apart."""
    names = [row_label(r, with_shots) for r in df.select("method", "shots", "variant", "schedule",
                                                         "models").iter_rows(named=True)]
    return df.with_columns(pl.col("method").alias("kind"), pl.Series("method", names, pl.String))


def _fmt(mean, std=None, seeds=None) -> str:
    """"mean ± std", or the mean alone where there is no spread: one seed's std of 0 is no measurement."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None or seeds == 1 else f"{mean:.2f} ± {std:.2f}"


def seeds_note(where: str, seeds) -> list[str]:
    """The line a table's row needs when it lacks a seed of the papers' protocol (the seeds asked for are not
    known here), or none."""
    present = sorted(set(seeds))
    if set(SEEDS) <= set(present):
        return []
    return [f"{where}: seeds present: {', '.join(map(str, present))}; the papers' protocol uses "
            f"{', '.join(map(str, SEEDS))}"]


def b2n_table(df: pl.DataFrame, problems: list[str], shown: set | None = None) -> tuple[list[dict], list[str]]:
    """Rows (dataset, method, shots, variant, schedule, base/novel mean and std, HM, seeds), one per configuration;
    incomplete seeds are listed in problems. `shown` gets the paths of the results it reads."""
    b2n = df.filter(pl.col("setting").is_in(["b2n", "zeroshot"]) & pl.col("split").is_in(["base", "novel"]))
    if shown is not None:
        shown.update(b2n["path"])
    rows, config = [], ["method", "shots", "variant", "schedule", "models"]
    for (dataset, *key), group in b2n.group_by(["dataset", *config], maintain_order=True):
        this = dict(zip(config, key))
        name = row_label(this)
        per_seed = group.pivot(on="split", index="seed", values="accuracy")  # one value each (collect's KEY)
        for split in ("base", "novel"):
            if split not in per_seed.columns:
                per_seed = per_seed.with_columns(pl.lit(None, pl.Float64).alias(split))
        runs = dict(group.select("seed", "run").iter_rows())
        for seed, base, novel in per_seed.select("seed", "base", "novel").iter_rows():
            if base is None or novel is None:
                missing = "novel" if novel is None else "base"
                which = (f"--method zeroshot --dataset {dataset}" if this["method"] == "zeroshot" else
                         f"--run {shlex.quote(runs[seed])}")
                problems.append(f"{dataset} {name} seed {seed}: no {missing} result (run `mugcp eval {which} --split "
                                f"{missing}`)")
        if this["method"] != "zeroshot":
            problems += seeds_note(f"{dataset} {name}", per_seed["seed"])
        done = per_seed.drop_nulls(["base", "novel"])
        if done.height:
            b, n = done["base"].mean(), done["novel"].mean()
            rows.append({"dataset": dataset, **this, "seeds": done.height, "base": b,
                         "base_std": done["base"].std(ddof=0), "novel": n, "novel_std": done["novel"].std(ddof=0),
                         "hm": harmonic_mean(b, n)})
    rows.sort(key=lambda r: (r["dataset"], *(r[k] for k in config)))
    for key in sorted({tuple(r[k] for k in config) for r in rows}):
        mine = [r for r in rows if tuple(r[k] for k in config) == key and r["dataset"] in BASE_TO_NOVEL]
        if mine:
            b, n = float(np.mean([r["base"] for r in mine])), float(np.mean([r["novel"] for r in mine]))
            have = {r["dataset"] for r in mine}
            name = "average" if have == set(BASE_TO_NOVEL) else f"average ({len(have)}/11)"
            rows.append({"dataset": name, **dict(zip(config, key)), "seeds": None, "base": b,
                         "base_std": None, "novel": n, "novel_std": None, "hm": harmonic_mean(b, n)})
    return rows, problems


def build_table(runs_dir: Path) -> tuple[list[dict], list[str]]:
    """The base-to-novel rows and the list of missing pieces."""
    df, problems = collect(Path(runs_dir))
    return b2n_table(df, problems)


BEYOND_SPREAD = "* beyond the seeds' spread: the two rows' mean ± std intervals do not overlap"


def beyond_spread(a: dict, b: dict, key: str) -> bool | None:
    """Whether two table rows differ in `key` ("base", "novel") by more than the seeds' spread
    (`BEYOND_SPREAD`); None where either has fewer than two seeds."""
    if (a["seeds"] or 0) < 2 or (b["seeds"] or 0) < 2:
        return None
    return abs(a[key] - b[key]) > a[f"{key}_std"] + b[f"{key}_std"]


def ablation_rows(rows: list[dict]) -> list[dict]:
    """Every variant set against its method's default variant on the same dataset, trained with the same shots and
    schedule (differences of seed means: an ablation changes one thing). `beyond_base` / `beyond_novel`: whether
    the difference exceeds the seeds' spread (`BEYOND_SPREAD`; None with fewer than two seeds on either side),
    the test a claim such as "real SCP beats shuffled SCP" must pass."""
    same = ("dataset", "method", "shots", "schedule", "models")
    default = {tuple(r[k] for k in same): r for r in rows if not r["variant"]}
    out = []
    for r in rows:
        ref = default.get(tuple(r[k] for k in same))
        if r["variant"] and ref is not None:
            out.append({**r, **{f"d_{k}": round(r[k] - ref[k], 6) + 0.0 for k in ("base", "novel", "hm")},  # no -0.00
                        **{f"beyond_{k}": beyond_spread(r, ref, k) for k in ("base", "novel")}})
    return out


def delta(row: dict, key: str, width: int = 0) -> str:
    """An ablation row's difference, starred when beyond the seeds' spread."""
    return f"{row[f'd_{key}']:+{width}.2f}{'*' if row.get(f'beyond_{key}') else ''}"


def ablation_markdown(rows: list[dict]) -> list[str]:
    """The ablation table's lines ([] when no run is a variant)."""
    ablations = ablation_rows(rows)
    if not ablations:
        return []
    out = ["Ablations and controls (differences of seed means against the method's defaults; ± is the seeds' std):",
           "", "| Dataset | Method | Variant | Seeds | Base | Novel | HM | Δ Base | Δ Novel | Δ HM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['dataset']} | {label(r['method'], r['models'], shots_note(r['shots']), r['schedule'])} | "
            f"{r['variant']} | "
            f"{r['seeds'] or ''} | {_fmt(r['base'], r['base_std'], r['seeds'])} | "
            f"{_fmt(r['novel'], r['novel_std'], r['seeds'])} | {r['hm']:.2f} | "
            f"{delta(r, 'base')} | {delta(r, 'novel')} | {r['d_hm']:+.2f} |" for r in ablations]
    return out + ["", BEYOND_SPREAD]


def b2n_markdown(rows: list[dict]) -> list[str]:
    out = ["| Dataset | Method | Seeds | Base | Novel | HM |", "|---|---|---|---|---|---|"]
    out += [f"| {r['dataset']} | {row_label(r)} | {r['seeds'] or ''} | {_fmt(r['base'], r['base_std'], r['seeds'])} | "
            f"{_fmt(r['novel'], r['novel_std'], r['seeds'])} | {r['hm']:.2f} |" for r in rows]
    out += ["", "Published 11-dataset averages (ViT-B/16, 16 shots):", "", "| Method | Base | Novel | HM |",
            "|---|---|---|---|"]
    out += [f"| {m} | {b:.2f} | {n:.2f} | {h:.2f} |" for m, (b, n, h) in PUBLISHED.items()]
    ablations = ablation_markdown(rows)
    return out + ([""] + ablations if ablations else [])


def fewshot_tables(df: pl.DataFrame, shown: set | None = None,
                   problems: list[str] | None = None) -> tuple[dict, list[str]]:
    """{dataset: {method: {shots: (mean, std, seeds)}}} (zero-shot CLIP under shots 0) and the Markdown: each
    run's all-classes test on its own dataset. `shown` gets the paths of the results it reads, `problems` the
    rows that lack a seed."""
    df = _labelled(df.filter(pl.col("split") == "all"), with_shots=False)  # shots are the columns
    few = df.filter((pl.col("setting") == "fewshot") & (pl.col("dataset") == pl.col("source")))
    if problems is not None:
        for (dataset, method, shots), group in few.group_by(["dataset", "method", "shots"], maintain_order=True):
            problems += seeds_note(f"{dataset} {method} {shots} shot{'s' * (shots > 1)}", group["seed"])
    zero = df.filter((pl.col("kind") == "zeroshot") & pl.col("dataset").is_in(few["dataset"].unique().to_list()))
    if shown is not None:
        shown.update([*few["path"], *zero["path"]])
    curves: dict = {}
    for row in _cells(pl.concat([few, zero]), ["dataset", "method", "shots"]).iter_rows(named=True):
        curves.setdefault(row["dataset"], {}).setdefault(row["method"], {})[row["shots"]] = (
            row["mean"], row["std"], row["seeds"])
    out = []
    for dataset, methods in sorted(curves.items()):
        shots = sorted({s for m in methods.values() for s in m if s})
        out += [f"**{dataset}**", "", "| Method | " + " | ".join(f"{s} shot{'s' * (s > 1)}" for s in shots) + " |",
                "|---|" + "---|" * len(shots)]
        for method, points in sorted(methods.items()):
            if 0 in points:  # zero shots: zero-shot CLIP
                out.append(f"| {method} | {_fmt(points[0][0])} (no training) |" + " |" * (len(shots) - 1))
            else:
                out.append(f"| {method} | " + " | ".join(_fmt(*points[s]) if s in points else "-" for s in shots) + " |")
        out.append("")
    return curves, out


def transfer_table(df: pl.DataFrame, setting: str, shown: set | None = None,
                   problems: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Rows: method, source, the source's accuracy and each target's (mean, std, seeds), target average; a table
    per source (runs trained on different sources are never averaged), targets in the papers' order. `shown`
    gets the paths of the results it reads, `problems` the rows that lack a seed."""
    df = _labelled(df.filter(pl.col("split") == "all"), with_shots=True)
    on_targets = df.filter(pl.col("setting") == setting)
    sources = sorted(set(on_targets["source"]), key=lambda s: (s != "imagenet", s))  # the papers' source first
    rows, out = [], []
    for source in sources:
        table, lines = _source_table(df, on_targets.filter(pl.col("source") == source), setting, source, shown,
                                     problems)
        rows += table
        out += ([f"Trained on {source}:", ""] if len(sources) > 1 else []) + lines + [""]
    return rows, out[:-1]


def _source_table(df: pl.DataFrame, mine: pl.DataFrame, setting: str, source: str, shown: set | None,
                  problems: list[str] | None) -> tuple[list[dict], list[str]]:
    """`transfer_table`'s rows and Markdown for the runs trained on `source` (`mine`: their results on targets)."""
    order = TRANSFER_TARGETS if setting == "xd" else DOMAIN_TARGETS
    targets = sorted(set(mine["dataset"]), key=lambda d: (order.index(d) if d in order else len(order), d))
    columns = [source, *targets]
    # the source column: the same run folders' own test (a transfer run's, or the few-shot run they share), on the
    # rows their targets name: one run is one row, though its own test is judged against the few-shot reference
    # (a test-time control's own test joins the control's row, the run's own test its own row)
    rows_of = mine.select("run", "tested", "method").unique(["run", "tested"])
    own = df.filter(pl.col("dataset") == pl.col("source")).drop("method").join(rows_of, on=["run", "tested"])
    own = own.select(df.columns)
    zero = df.filter((pl.col("kind") == "zeroshot") & pl.col("dataset").is_in(columns))
    if shown is not None:
        shown.update([*mine["path"], *own["path"], *zero["path"]])
    if problems is not None:
        for (method,), group in mine.group_by(["method"], maintain_order=True):
            problems += seeds_note(f"{setting} from {source}: {method}", group["seed"])
    cells = _cells(pl.concat([mine, own, zero]), ["method", "dataset"])
    table = []
    for method in sorted(set(cells["method"])):
        held = {r["dataset"]: (r["mean"], r["std"], r["seeds"])
                for r in cells.filter(pl.col("method") == method).iter_rows(named=True)}
        have = [held[t][0] for t in targets if t in held]
        table.append({"method": method, "source": source, **{c: held.get(c) for c in columns},
                      "average": float(np.mean(have)) if len(have) == len(targets) else None})
    lines = ["| Method | " + " | ".join([f"{source} (source)", *targets]) + " | Average |",
             "|---|" + "---|" * (len(columns) + 1)]
    lines += [f"| {r['method']} | " + " | ".join(_fmt(*r[c]) if r[c] else "-" for c in columns) +
              f" | {_fmt(r['average'])} |" for r in table]
    return table, lines + published_transfer_markdown(setting, [source], targets)


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
        ax.set_xticks(x, [textwrap.fill(row_label(r), 24) for r in mine], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{dataset} (base-to-novel)")
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)


def plot_fewshot(curves: dict, ax_grid) -> None:
    for ax, (dataset, methods) in zip(ax_grid, sorted(curves.items())):
        for method, points in sorted(methods.items()):
            if 0 in points:  # zero shots: zero-shot CLIP
                ax.axhline(points[0][0], ls="--", c="grey", label=method.replace("zeroshot", "zero-shot CLIP"))
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
    columns = list(dict.fromkeys(c for r in rows for c in r if c not in ("method", "source", "average")))
    sources = len({r["source"] for r in rows}) > 1
    x = np.arange(len(columns))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r[c][0] if r.get(c) else 0 for c in columns], width,
               label=f"{r['method']} (from {r['source']})" if sources else r["method"])
    ax.set_xticks(x + 0.4 - width / 2, columns, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(TITLES[setting])
    ax.legend(fontsize=7)


def write_report(runs_dir: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """Write report.md, report.csv and report.png (default: into RUNS_DIR); return the Markdown and paths."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir} is a file, not a runs folder" if runs_dir.exists() else
                        f"runs folder not found: {runs_dir}")
    df, problems = collect(runs_dir)
    if df.is_empty() and not problems:
        raise UserError(f"no results under {runs_dir}: run `mugcp train` and `mugcp eval` (or `mugcp sweep`) first")
    shown: set[str] = set()
    b2n_rows, problems = b2n_table(df, problems, shown)
    curves, fewshot_md = fewshot_tables(df, shown, problems)
    transfers = {s: transfer_table(df, s, shown, problems) for s in ("xd", "dg")}
    unshown = sorted(set(df["path"]) - shown)  # e.g. a base-to-novel run tested on --split all
    md = [LEGEND, ""]
    if b2n_rows:
        md += [f"## {TITLES['b2n']}", ""] + b2n_markdown(b2n_rows) + [""]
    if curves:
        md += [f"## {TITLES['fewshot']}", ""] + fewshot_md
    for setting, (rows, lines) in transfers.items():
        if rows:
            md += [f"## {TITLES[setting]}", ""] + lines + [""]
    if problems:
        md += ["Missing or incomplete:", ""] + [f"- {p}" for p in problems]
    if unshown:
        md += ([""] if problems else []) + [f"In no table ({len(unshown)} result(s) of no setting shown here):", ""]
        md += [f"- {p}" for p in unshown[:10]] + ([f"- ... and {len(unshown) - 10} more"] if len(unshown) > 10 else [])
    md = "\n".join(md) + "\n"
    out = Path(out or runs_dir)
    files = {out / "report.md": md.encode()}  # every file rendered first, then written: none left half-updated
    tables = {"b2n": pl.DataFrame(b2n_rows) if b2n_rows else None,
              "fewshot": pl.DataFrame([{"dataset": d, "method": m, "shots": s, "mean": v[0], "std": v[1],
                                        "seeds": v[2]}
                                       for d, ms in curves.items() for m, pts in ms.items() for s, v in pts.items()])
              if curves else None}
    for setting, (rows, _) in transfers.items():
        if rows:  # one column per dataset of any source's table ("" where a source's runs were not tested there)
            columns = list(dict.fromkeys(k for r in rows for k in r))
            tables[setting] = pl.DataFrame([{k: (v[0] if isinstance(v, tuple) else v)
                                             for k, v in ((k, r.get(k)) for k in columns)} for r in rows])
    for setting, table in tables.items():
        if table is not None:
            files[out / f"report_{setting}.csv"] = table.write_csv(float_precision=4).encode()
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
        files[out / "report.png"] = buf.getvalue()
    for path in files:
        if path.is_dir() or (path.parent.exists() and not path.parent.is_dir()):
            raise UserError(f"cannot write {path}: {'it is a folder' if path.is_dir() else 'its folder is a file'}")
    write_files_atomic(files)
    for earlier in [out / f"report_{setting}.csv" for setting in SETTINGS] + [out / "report.png"]:
        if earlier not in files:  # an earlier report's table or figure that this one does not have
            earlier.unlink(missing_ok=True)
    return md, list(files)

