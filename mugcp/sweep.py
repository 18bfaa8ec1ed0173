"""`mugcp sweep`: the papers' four settings as one restartable command, one run at a time or as Ray tasks.

- **b2n** (base-to-novel): per dataset, method and seed, train on the base classes (16 shots) and
  test on base and novel.
- **fewshot**: per dataset, method, seed and shot count (1, 2, 4, 8, 16), train on all classes and
  test on all.
- **xd** (cross-dataset transfer) and **dg** (domain generalisation): per method and seed, train on
  ImageNet's 1,000 classes (16 shots) once, and test those prompts on the ten other datasets (xd) and
  on ImageNet-V2, -Sketch, -A and -R (dg); the source run is shared.

Each run gets its method's reference config for its setting (`reference_overrides` in the method's
file: MaPLe's and PromptSRC's cross-dataset configs, CoOp's and PromptSRC's few-shot ones), then the user's
`--set` overrides. A source run whose config is not the few-shot one is `transfer_shots16`.

Zero-shot CLIP is evaluated wherever a table needs it. Stage one runs first for the methods that read
SCP, and only where the cache lacks rows (the sources' few-shot draws, the targets' test images).
Finished runs and results are skipped, a partial run resumes: safe to stop and start again. With
`ray_address`, every run becomes a Ray task (one GPU each, or CPUs when the cluster has none) writing
into the same runs folder (a shared file system on a cluster); a task whose worker dies is retried and
resumes from its last checkpoint. Top floor: it only calls the stages' public functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mugcp.core.coop_datasets import DOMAIN_TARGETS, TRANSFER_TARGETS, get_spec, load_dataset
from mugcp.core.errors import UserError
from mugcp.core.files import write_bytes_atomic
from mugcp.core.frozen_clip import model_id_for
from mugcp.core.locks import command_line, name_command
from mugcp.core.progress import progress
from mugcp.core.ray_cluster import check_gpus, join
from mugcp.pipeline.config import ExtractConfig
from mugcp.pipeline.extract import run_extract
from mugcp.trainer.config import run_config
from mugcp.trainer.evaluation import run_eval, run_untrained, untrained_results_path
from mugcp.trainer.methods import method_class
from mugcp.trainer.report import write_report
from mugcp.trainer.results import current_results, readable_results, results_path, weights_digest
from mugcp.trainer.runs import FINAL_WEIGHTS, RunSpec, finished_differently, read_run, recorded_differences
from mugcp.trainer.train import run_train

DEFAULT_DATASETS = ["dtd"]  # what b2n and fewshot train on when --datasets is left out

SETTINGS = ("b2n", "fewshot", "xd", "dg")
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)


@dataclass
class Job:
    """One training run and the evaluations it owes: (dataset, split), dataset None = its own; each of its own
    dataset's evaluations once more per test-time SCP control in `test_scp` (`mugcp eval --scp`)."""

    spec: RunSpec
    evals: list[tuple[Optional[str], str]] = field(default_factory=list)
    test_scp: tuple[str, ...] = ()
    # what the data and CLIP are now (`expect`, in the sweep's own process: a Ray task, a process of its own,
    # would read every dataset again): the split digest per dataset read, the CLIP's id
    digests: dict = field(default_factory=dict)
    clip_id: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.spec.dataset} {self.spec.method} {self.spec.setting} seed {self.spec.seed}"


@dataclass
class Plan:
    jobs: dict = field(default_factory=dict)  # run folder -> Job
    untrained: set = field(default_factory=set)  # (method, dataset, split)
    describe: dict = field(default_factory=dict)  # dataset -> {"shots": set, "test_only": bool, "train_classes": str}

    def job(self, spec: RunSpec, output: Path, *evals, test_scp: tuple[str, ...] = ()) -> None:
        job = self.jobs.setdefault(spec.run_dir(output), Job(spec))
        job.evals += [e for e in evals if e not in job.evals]
        own = (spec.config.get("conditions") or {}).get("scp")  # the SCP a run trained with is its own test
        job.test_scp += tuple(c for c in test_scp if c not in job.test_scp and c != own)

    def needs(self, dataset: str, shots: Optional[int] = None, train_classes: str = "all") -> None:
        """Stage one must describe `dataset`'s test images and, with `shots`, the shots of `train_classes`."""
        entry = self.describe.setdefault(dataset, {"shots": set(), "test_only": True, "train_classes": "base"})
        if shots is not None:
            entry["shots"].add(shots)
            entry["test_only"] = False
            if train_classes == "all":
                entry["train_classes"] = "all"


def make_plan(settings: list[str], datasets: Optional[list[str]], methods: list[str], seeds: list[int], *, root: Path,
              output: Path, shots: int, fewshot_shots: list[int], source: str, clip: str, pretrained: Optional[str],
              cache_dir: Path, mllm: Optional[str], overrides: list[str] = (), test_scp: tuple[str, ...] = ()) -> Plan:
    """Every run and evaluation the settings need (`test_scp`: test-time controls of the runs that read SCP).
    `datasets` None: b2n and fewshot train on DTD alone, xd and dg test on all of their targets.
    A transfer source run whose reference config equals the method's few-shot one is the few-shot run of the
    same shots (shared); otherwise it has its own folder."""
    for name in [*(datasets or ()), source]:
        get_spec(name)  # a misspelt dataset is one line before any work, not a failure per run at the end
    plan = Plan()
    untrained = [m for m in methods if not method_class(m).trains]
    trained = [m for m in methods if method_class(m).trains]

    @functools.lru_cache(maxsize=None)  # the same for every seed: resolve it once (a bad override fails here)
    def configured(method, protocol, dataset, k):
        return run_config(method, protocol, dataset, k, None, overrides)

    def controls(method):
        return test_scp if method_class(method).reads_scp() else ()

    def spec(dataset, method, k, seed, subsample, protocol):
        config, folder = configured(method, protocol, dataset, k)
        return RunSpec(dataset, str(Path(root).resolve()), method, k, seed, subsample, clip, pretrained,
                       str(Path(cache_dir).resolve()), mllm, config.to_dict(), folder)

    for setting in settings:
        trainable = [d for d in datasets or DEFAULT_DATASETS if d not in DOMAIN_TARGETS]  # shifted sets: dg only
        if setting in ("b2n", "fewshot") and not trainable:
            raise UserError(f"--setting {setting} trains on its datasets, and {', '.join(datasets)} are test-only "
                            f"sets (ImageNet's shifted test sets are domain-generalisation targets: --setting dg)")
        if setting == "b2n":
            for d in trainable:
                plan.untrained |= {(m, d, s) for m in untrained for s in ("base", "novel")}
                plan.needs(d, shots, "base")
                for m in trained:
                    for seed in seeds:
                        plan.job(spec(d, m, shots, seed, "base", "b2n"), output, (None, "base"), (None, "novel"),
                                 test_scp=controls(m))
        elif setting == "fewshot":
            for d in trainable:
                plan.untrained |= {(m, d, "all") for m in untrained}
                for k in fewshot_shots:
                    plan.needs(d, k)
                    for m in trained:
                        for seed in seeds:
                            plan.job(spec(d, m, k, seed, "all", "fewshot"), output, (None, "all"),
                                     test_scp=controls(m))
        else:
            pool = TRANSFER_TARGETS if setting == "xd" else DOMAIN_TARGETS
            targets = [d for d in pool if d != source and (not datasets or d in datasets)]  # the papers' order
            if not targets:
                raise UserError(f"--setting {setting} tests on {', '.join(pool)}; --datasets names none of them "
                                f"(leave it out for all of them)")
            plan.needs(source, shots)
            plan.untrained |= {(m, d, "all") for m in untrained for d in [source, *targets]}
            for t in targets:
                plan.needs(t)
            for m in trained:
                for seed in seeds:
                    plan.job(spec(source, m, shots, seed, "all", "transfer"), output, (None, "all"),
                             *[(t, "all") for t in targets], test_scp=controls(m))
    return plan


@functools.lru_cache(maxsize=None)
def _clip_id(clip: str, pretrained: Optional[str]) -> str:
    return model_id_for(clip, pretrained)  # hashes a checkpoint file: once per sweep, not once per run


@functools.lru_cache(maxsize=None)
def _split_digest(dataset: str, root: str) -> str:
    return load_dataset(dataset, root, check_files=False).digest()  # the split's lists only, once per sweep


def expect(job: Job) -> Job:
    """`job` with what its CLIP and the datasets it reads are now; a dataset that cannot be read is left out
    (its evaluation then fails on its own line)."""
    job.clip_id = _clip_id(job.spec.clip, job.spec.pretrained)
    for dataset in {job.spec.dataset, *(d for d, _ in job.evals if d)}:
        try:
            job.digests[dataset] = _split_digest(dataset, job.spec.root)
        except UserError:
            pass
    return job


def run_job(job: Job, output: Path, device: torch.device, workers: Optional[int], log=print) -> list[str]:
    """Train (skipped when finished, resumed when partial), then the evaluations not yet written.

    A finished run is kept only if it was trained as this job asks (config, CLIP weights, its data's
    split); one trained otherwise (an earlier sweep with another --set, into the same --output) is refused, so
    that no report shows weights for a config the command did not train."""
    run_dir = job.spec.run_dir(output)
    if job.clip_id is None:  # not filled by a sweep (the demo, a bench): find it here
        expect(job)
    if (run_dir / FINAL_WEIGHTS).is_file():
        changed = finished_differently(run_dir, job.spec, job.clip_id, job.digests.get(job.spec.dataset))
        if changed:
            raise UserError(f"{run_dir} holds a finished run trained otherwise ({'; '.join(changed)}): sweep into "
                            f"another --output, or delete that run folder to train it as asked")
    else:
        # resume: a partial run continues, a fresh folder starts a new one; another sweep's run is waited for
        run_train(job.spec, output=output, device=device, resume=True, workers=workers, log=log,
                  wait=lambda holder: log(f"{run_dir} is being trained by {holder}: waiting for it"))
    lines, failed = [], []
    controls = [(dataset, split, c) for dataset, split in job.evals if dataset is None for c in job.test_scp]
    run, weights = read_run(run_dir), weights_digest(run_dir)
    for dataset, split, control in [(d, s, None) for d, s in job.evals] + controls:
        held = current_results(results_path(run_dir, split, dataset, control), run, weights)
        now = job.digests.get(dataset or job.spec.dataset)
        if held is None or held.get("split_digest", now) != now:  # missing, damaged, of other weights or data
            try:
                lines += run_eval(run=run_dir, output=output, split=split, root=Path(job.spec.root), device=device,
                                  dataset=dataset, workers=workers, test_scp=control)
            except UserError as e:  # one target that cannot be read must not keep the others untested
                failed.append(f"{dataset or job.spec.dataset} {split}: {e}")
    if failed:
        for line in lines:
            log(line)
        raise UserError(f"{len(failed)} evaluation(s) failed, the others are written: {'; '.join(failed)}")
    return lines


def _remote_job(job: Job, output: Path, workers: Optional[int], command: str) -> tuple[str, str]:
    """A Ray task: ("done" | "failed", what to say). Worker deaths are Ray's to retry, user errors are final.
    `command` is the sweep's, which the run folder's lock names (not the Ray worker's own command line)."""
    name_command(command)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lines = run_job(job, output, device, workers, log=lambda _: None)
        return "done", "; ".join(lines) or "already finished"
    except UserError as e:
        return "failed", str(e)


def _zero_shot(method, dataset, split, root, clip, pretrained, device, output, workers, log) -> None:
    """An untrained method's results, evaluated unless a readable file of the same CLIP and data holds them."""
    held = readable_results(untrained_results_path(output, method, dataset, split))
    if held is None:  # missing or damaged
        run_untrained(method, dataset, root, split=split, clip=clip, pretrained=pretrained, device=device,
                      output=output, workers=workers, log=log)
        return
    asked = {"clip": _clip_id(clip, pretrained), "split_digest": _split_digest(dataset, str(root))}
    changed = recorded_differences(held, asked)
    if changed:
        raise UserError(f"{untrained_results_path(output, method, dataset, split)} holds results for another CLIP or "
                        f"data ({'; '.join(changed)}): sweep into another --output, or delete that file")


def run_sweep(settings: list[str], datasets: Optional[list[str]], methods: list[str], seeds: list[int], root: Path, *,
              shots: int = 16, fewshot_shots: list[int] = FEWSHOT_SHOTS, source: str = "imagenet",
              output: Path = Path("runs"), cache_dir: Path = Path("cache"), clip: str, pretrained: Optional[str],
              mllm: Optional[str] = None, device: torch.device, extract: Optional[ExtractConfig] = None,
              overrides: list[str] = (), test_scp: tuple[str, ...] = (), workers: Optional[int] = None,
              ray_address: Optional[str] = None, gpus_per_run: Optional[float] = None,
              log=print) -> tuple[str, list[Path], int]:
    """Run the plan; return the report's Markdown, the files written and how many parts failed."""
    _clip_id.cache_clear()  # what the data and CLIP are is read anew by each sweep, even in one process
    _split_digest.cache_clear()
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise UserError(f"unknown --setting '{unknown[0]}': choose among {', '.join(SETTINGS)}")
    classes = {m: method_class(m) for m in methods}  # unknown names fail here, before any work
    plan = make_plan(settings, datasets, methods, seeds, root=root, output=output, shots=shots,
                     fewshot_shots=fewshot_shots, source=source, clip=clip, pretrained=pretrained,
                     cache_dir=cache_dir, mllm=mllm, overrides=overrides, test_scp=tuple(test_scp))
    failures = []
    if extract is not None and any(cls.reads_scp() for cls in classes.values()):
        for dataset, need in plan.describe.items():
            config = extract.model_copy(update={"shots": tuple(sorted(need["shots"])) or extract.shots,
                                                "seeds": tuple(seeds), "train_classes": need["train_classes"],
                                                "splits": ("test",) if need["test_only"] else extract.splits})
            try:
                summary = run_extract(dataset, root, config, log=log)
            except UserError as e:  # a dataset that cannot be read or described: its runs fail on their own lines
                failures.append(f"{dataset} stage one: {e}")
                log(f"[sweep] skipped {failures[-1]}")
                continue
            if summary.failed:
                failures.append(f"{dataset}: {summary.failed} image(s) failed in stage one")
    for method, dataset, split in sorted(plan.untrained):
        try:
            _zero_shot(method, dataset, split, root, clip, pretrained, device, output, workers, log)
        except UserError as e:  # one dataset's failure must not stop the benchmark
            failures.append(f"{method} {dataset} {split}: {e}")
            log(f"[sweep] skipped {failures[-1]}")
    jobs = [expect(job) for job in plan.jobs.values()]
    if ray_address is None:
        for job in jobs:
            try:
                for line in run_job(job, output, device, workers, log):
                    log(line)
            except UserError as e:  # one broken run must not stop the benchmark
                failures.append(f"{job.name}: {e}")
                log(f"[sweep] skipped {job.name}: {e}")
    else:
        failures += _run_on_ray(jobs, output, workers, ray_address, gpus_per_run, log)
    md, paths = write_report(output)
    if failures:
        md += "\nSweep failures:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
        write_bytes_atomic(paths[0], md.encode())  # the report file lists them too
    return md, paths, len(failures)


def _run_on_ray(jobs: list[Job], output: Path, workers: Optional[int], address: str,
                gpus_per_run: Optional[float], log) -> list[str]:
    """Every run a Ray task; live counts of done / running / failed; returns the failures."""
    join(address, "--ray")
    import ray

    gpus = gpus_per_run if gpus_per_run is not None else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    check_gpus(gpus, "--gpus-per-run")
    task = ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_retries=3)(_remote_job)
    command = command_line() + " (a Ray task of it)"
    pending = {task.remote(job, Path(output).resolve(), workers, command): job for job in jobs}
    failures, done = [], 0
    with progress() as bar:
        counter = bar.add_task("sweep runs", total=len(jobs))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    status, message = ray.get(ref)
                except ray.exceptions.RayError as e:  # retries exhausted: the run resumes next time
                    status, message = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if status == "failed":
                    failures.append(f"{job.name}: {message}")
                done += 1
                log(f"[sweep] {status} {job.name}: {message}")
            bar.update(counter, completed=done, description=f"sweep runs: {done} done ({len(failures)} failed), "
                                                            f"{min(len(pending), _slots(ray, gpus))} running")
    return failures


def _slots(ray, gpus: float) -> int:
    """How many runs the cluster runs at once (its GPUs, or its CPUs)."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0) / gpus) if gpus else int(resources.get("CPU", 1))
