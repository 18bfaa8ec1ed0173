"""`mugcp import`: checkpoints laid out as each reference trainer saves them (Dassl's dict, the reference's own
tensor names, written out here from the reference code) become run folders whose weights sit where the
reference uses them, which `mugcp eval` and `mugcp report` read; what is not such a checkpoint is refused."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line, cli
from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import load_clip
from mugcp.trainer.checkpoints import load_tensors
from mugcp.trainer.evaluation import trained_method
from mugcp.trainer.methods import method_class
from mugcp.trainer.runs import RunSpec
from mugcp.world.synth import DTD_CLASSES

BASE = 24  # the synthetic DTD's base classes (47 classes)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip, tmp_path_factory):
    """The tiny CLIP's weights in a QuickGELU config: the reference code runs OpenAI's CLIP, which uses QuickGELU."""
    config = tmp_path_factory.mktemp("quick") / "mugcp-tiny-clip-quickgelu.json"
    config.write_text(json.dumps({**json.loads(Path(tiny_clip[0]).read_text()), "quick_gelu": True}))
    return config, tiny_clip[1]


@pytest.fixture(scope="module")
def frozen_tiny(tiny_clip):
    return load_clip(str(tiny_clip[0]), str(tiny_clip[1]))


class Scheduler:
    """A stand-in for what Dassl pickles whole beside the tensors (its warm-up scheduler's successor)."""

    def __init__(self):
        self.base_lrs, self.last_epoch = [0.002], 5


class Planted:
    """An object whose unpickling would run code: reading a checkpoint must never do it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


BASE_NAMES = [c.replace("_", " ") for c in DTD_CLASSES[:BASE]]
OTHER_NAMES = ["airplane"] + [c.replace("_", " ") for c in DTD_CLASSES[BASE:]]  # as many, other classes


def class_prompts(frozen, prompt: str, n_ctx: int, classnames: list[str], dtype=torch.float32):
    """What a reference prompt learner saves: the embedded "<SOT> {prompt} {class}." split after the context."""
    with torch.no_grad():
        emb = frozen.model.token_embedding(frozen.tokenize([f"{prompt} {c}." for c in classnames])).to(dtype)
    return {"token_prefix": emb[:, :1].clone(), "token_suffix": emb[:, 1 + n_ctx:].clone()}


def reference_state(method: str, frozen, *, n_ctx: int | None = None, depth: int = 3, dtype=torch.float32,
                    prompt: str | None = None, classnames: list[str] | None = None, csc: bool = False,
                    sot: torch.Tensor | None = None, conv1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A state dict under the reference code's names, as its trainer saves it, for the tiny CLIP's widths: the
    references' base-to-novel context ("a photo of a": 4 tokens, MaPLe 2 of them) unless `n_ctx` says otherwise
    (then a random start, "X X ..."), trained on the synthetic DTD's base classes unless `classnames`."""
    g = torch.Generator().manual_seed(5)
    d, v = frozen.text_width, frozen.vision_width
    n_ctx = n_ctx or (2 if method == "maple" else 4)
    words = 2 if method == "maple" else 4
    prompt = prompt or ("a photo of a" if n_ctx == words else " ".join(["X"] * n_ctx))
    classnames = classnames or BASE_NAMES

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    buffers = class_prompts(frozen, prompt, n_ctx, classnames, dtype)
    if sot is not None:
        buffers["token_prefix"] = sot.to(dtype).expand(len(classnames), 1, d).clone()
    ctx = r(len(classnames), n_ctx, d) if csc else r(n_ctx, d)
    if method in ("coop", "kgcoop"):
        extra = {"bias_vectors": r(1, 512), "meta_net.linear1.weight": r(512, 512)} if method == "kgcoop" else {}
        return {"ctx": ctx, **buffers, **extra}
    if method == "cocoop":
        e = frozen.embed_dim
        return {"ctx": ctx, "meta_net.linear1.weight": r(e // 16, e), "meta_net.linear1.bias": r(e // 16),
                "meta_net.linear2.weight": r(d, e // 16), "meta_net.linear2.bias": r(d), **buffers}
    conv1 = frozen.model.visual.conv1.weight.detach().to(dtype) if conv1 is None else conv1
    frozen_towers = {"image_encoder.conv1.weight": conv1, "text_encoder.positional_embedding": r(77, d),
                     "logit_scale": torch.tensor(4.6), **{f"prompt_learner.{k}": t for k, t in buffers.items()}}
    if method == "maple":
        return {"prompt_learner.ctx": ctx, "prompt_learner.proj.weight": r(v, d), "prompt_learner.proj.bias": r(v),
                **{f"prompt_learner.compound_prompts_text.{i}": r(n_ctx, d) for i in range(depth - 1)},
                **{f"prompt_learner.compound_prompt_projections.{i}.{p}": r(v, d) if p == "weight" else r(v)
                   for i in range(depth - 1) for p in ("weight", "bias")}, **frozen_towers}
    assert method == "promptsrc"
    return {"prompt_learner.ctx": ctx, "image_encoder.VPT": r(4, v),
            **{f"image_encoder.transformer.resblocks.{i}.VPT_shallow": r(4, v) for i in range(1, depth)},
            **{f"text_encoder.transformer.resblocks.{i}.VPT_shallow": r(n_ctx, d) for i in range(1, depth)},
            "prompt_learner.ZS_image_encoder.conv1.weight": r(v, 3, 16, 16), **frozen_towers}


def save_reference(folder: Path, state: dict, *, name: str = "prompt_learner", epoch: int = 5, **extra) -> Path:
    """Dassl's `save_model`: `<folder>/<name>/model.pth.tar-<epoch>` and the `checkpoint` marker naming it."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    optimizer = {"state": collections.defaultdict(dict), "param_groups": [{"lr": 0.002, "params": [0]}]}
    torch.save({"state_dict": collections.OrderedDict(state), "epoch": epoch, "optimizer": optimizer,
                "scheduler": {"successor": Scheduler(), "last_epoch": epoch}, "val_result": None, **extra},
               folder / name / f"model.pth.tar-{epoch}")
    (folder / name / "checkpoint").write_text(f"model.pth.tar-{epoch}\n")
    return folder / name / f"model.pth.tar-{epoch}"


def import_args(tiny_clip, root, output, checkpoint, method, *extra):
    return ["import", checkpoint, "--method", method, "--dataset", "dtd", "--root", root, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", output, "--device", "cpu", *extra]


def imported_model(run: Path):
    info = json.loads((run / "run.json").read_text())
    model, _ = trained_method(run, info, RunSpec.from_record(info, run), torch.device("cpu"))
    return model, info


# where each reference tensor must land: (reference name, our parameter) for every learnt tensor
PLACES = {
    "coop": [("ctx", "ctx")],
    "kgcoop": [("ctx", "ctx")],
    "cocoop": [("ctx", "ctx"), ("meta_net.linear1.weight", "meta_net.0.weight"), ("meta_net.linear1.bias", "meta_net.0.bias"),
               ("meta_net.linear2.weight", "meta_net.2.weight"), ("meta_net.linear2.bias", "meta_net.2.bias")],
    # layer 0's visual prompts project the context (proj); layer i+1's text prompts are compound_prompts_text.i and
    # its visual prompts project them with compound_prompt_projections.i
    "maple": [("prompt_learner.ctx", "ctx"), ("prompt_learner.proj.weight", "to_visual.0.weight"),
              ("prompt_learner.proj.bias", "to_visual.0.bias"),
              ("prompt_learner.compound_prompts_text.0", "deep_text.0"),
              ("prompt_learner.compound_prompts_text.1", "deep_text.1"),
              ("prompt_learner.compound_prompt_projections.0.weight", "to_visual.1.weight"),
              ("prompt_learner.compound_prompt_projections.1.bias", "to_visual.2.bias")],
    # the vision tower's prompts: VPT appended before layer 0, resblocks.i.VPT_shallow replacing them before layer i;
    # the text tower's resblocks.i.VPT_shallow replace the context's tokens before layer i
    "promptsrc": [("prompt_learner.ctx", "ctx"), ("image_encoder.VPT", "vision_prompts.0"),
                  ("image_encoder.transformer.resblocks.1.VPT_shallow", "vision_prompts.1"),
                  ("image_encoder.transformer.resblocks.2.VPT_shallow", "vision_prompts.2"),
                  ("text_encoder.transformer.resblocks.1.VPT_shallow", "deep_text.0"),
                  ("text_encoder.transformer.resblocks.2.VPT_shallow", "deep_text.1")],
}
SAVED_AS = {"maple": "MultiModalPromptLearner", "promptsrc": "VLPromptLearner"}


@pytest.mark.parametrize("method", sorted(PLACES))
def test_each_reference_tensor_lands_where_the_reference_uses_it(method, frozen_tiny, tiny_clip, synth_root, tmp_path):
    state = reference_state(method, frozen_tiny)
    folder = tmp_path / "output/base2new/train_base/dtd/shots_16" / method / "vit_b16/seed2"
    save_reference(folder, state, name=SAVED_AS.get(method, "prompt_learner"))
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", folder, method))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs/dtd" / method / "b2n_shots16/seed2"  # seed and shots read off the reference's path
    model, info = imported_model(run)
    params = dict(model.named_parameters())
    assert {ours for _, ours in PLACES[method]} <= set(params)
    for theirs, ours in PLACES[method]:
        assert torch.equal(params[ours].detach(), state[theirs].float()), (theirs, ours)
    assert info["learnable_parameters"] == sum(p.numel() for p in params.values() if p.requires_grad)
    assert info["imported"]["epoch"] == 5 and info["imported"]["code"] == model.reference_code
    assert info["classnames"] == BASE_NAMES


def test_an_imported_run_is_evaluated_and_reported_as_imported(frozen_tiny, tiny_clip, synth_root, tmp_path):
    """A half-precision CoOp checkpoint of 16 random context tokens (CoOp's few-shot start, here in base-to-novel):
    the context length, the random start (no init words) and half precision come from the checkpoint."""
    folder = tmp_path / "coop/seed1"
    save_reference(folder, reference_state("coop", frozen_tiny, n_ctx=16, dtype=torch.float16))
    args = import_args(tiny_clip, synth_root, tmp_path / "runs", folder, "coop", "--shots", "16")
    assert cli(*args).returncode == 0
    run = tmp_path / "runs/dtd/coop/b2n_shots16/seed1"
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["method"] == {"n_ctx": 16, "ctx_init": "", "csc": False}
    assert info["config"]["optim"]["precision"] == "fp16" and info["imported"]["dtype"] == "float16"
    again = cli(*args)  # the same checkpoint again: kept, not rewritten
    assert again.returncode == 0 and "already holds" in again.stderr
    for split in ("base", "novel"):
        r = cli("eval", "--run", run, "--split", split, "--device", "cpu", "--workers", "0")
        assert r.returncode == 0, r.stderr
    novel = json.loads((run / "results_novel.json").read_text())
    assert novel["imported"]["sha256"] == info["imported"]["sha256"] and novel["eval_precision"] == "fp16"
    assert len(novel["classnames"]) == 47 - BASE
    r = cli("report", tmp_path / "runs")
    row = next(line for line in r.stdout.splitlines() if line.startswith("| dtd | coop"))
    assert "method.n_ctx=16" in row and "optim.precision=fp16, imported epoch 5]" in row, r.stdout
    trained = ["train", "--dataset", "dtd", "--root", synth_root, "--method", "coop", "--clip", tiny_clip[0],
               "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--shots", "16", "--set", "method.n_ctx=16",
               "--set", "method.ctx_init=''", "--set", "optim.precision=fp16", "--resume", "--workers", "0"]
    assert_one_line(cli(*trained), "imported from")
    (run / "prompt.safetensors").unlink()  # as if killed before its weights: it is imported again, not trained
    assert_one_line(cli("eval", "--run", run, "--split", "base"), "import it again", str(folder))


def test_reading_a_checkpoint_runs_none_of_its_code(frozen_tiny, tiny_clip, synth_root, tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "seed1"
    save_reference(folder, reference_state("coop", frozen_tiny), val_result=Planted(marker))
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", folder, "coop", "--shots", "4"))
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def refusal_cases():
    def other_method(frozen, folder):  # a MaPLe checkpoint given as CoOp's
        return save_reference(folder, reference_state("maple", frozen), name="MultiModalPromptLearner"), "coop", []

    def other_clip(frozen, folder):
        return save_reference(folder, reference_state("coop", frozen, sot=torch.ones(frozen.text_width))), "coop", []

    def other_vision_tower(frozen, folder):  # MaPLe saves its whole model: the same tokens, another patch embedding
        state = reference_state("maple", frozen, conv1=torch.zeros_like(frozen.model.visual.conv1.weight))
        return save_reference(folder, state, name="MultiModalPromptLearner"), "maple", []

    def other_classes(frozen, folder):  # trained on the base classes, imported as a run on every class
        return save_reference(folder, reference_state("coop", frozen)), "coop", ["--subsample", "all"]

    def deeper_than_clip(frozen, folder):  # MaPLe's depth 9 on a 3-layer CLIP
        return save_reference(folder, reference_state("maple", frozen, depth=9), name="M"), "maple", []

    def diverged(frozen, folder):
        state = reference_state("coop", frozen)
        state["ctx"][0, 0] = float("nan")
        return save_reference(folder, state), "coop", []

    def not_a_checkpoint(frozen, folder):
        folder.mkdir(parents=True)
        (folder / "model.pth.tar-5").write_text("not a checkpoint")
        return folder / "model.pth.tar-5", "coop", []

    def no_method_code(frozen, folder):
        return save_reference(folder, reference_state("coop", frozen)), "mugcp", []

    def two_checkpoints(frozen, folder):
        save_reference(folder, reference_state("coop", frozen), name="a")
        save_reference(folder, reference_state("coop", frozen), name="b")
        return folder, "coop", []

    def other_order(frozen, folder):  # class-specific contexts of the same classes, in another order
        state = reference_state("coop", frozen, csc=True, classnames=BASE_NAMES[::-1])
        return save_reference(folder, state), "coop", []

    def other_names(frozen, folder):  # as many classes, other names
        return save_reference(folder, reference_state("coop", frozen, classnames=OTHER_NAMES)), "coop", []

    def missing_marker_file(frozen, folder):
        save_reference(folder, reference_state("coop", frozen), epoch=10)
        (folder / "prompt_learner/checkpoint").write_text("model.pth.tar-50\n")
        return folder, "coop", []

    def class_token_in_the_middle(frozen, folder):  # CoOp's own folder name says where its class token sat
        return save_reference(folder.parent / "nctx16_cscFalse_ctpmiddle/seed1", reference_state("coop", frozen)), \
            "coop", []

    def flat_context(frozen, folder):
        state = reference_state("coop", frozen)
        state["ctx"] = state["ctx"][0]
        return save_reference(folder, state), "coop", []

    def flat_prefix(frozen, folder):
        state = reference_state("coop", frozen)
        state["token_prefix"] = torch.tensor(1.0)
        return save_reference(folder, state), "coop", []

    def number_keys(frozen, folder):
        return save_reference(folder, {**reference_state("coop", frozen), 3: torch.zeros(1)}), "coop", []

    return [(other_method, ["not a checkpoint of coop's reference code", "--method maple"]),
            (other_order, ["in another order"]), (other_names, ["prompts that do not match", f"'... {OTHER_NAMES[0]}.'"]),
            (missing_marker_file, ["names model.pth.tar-50, which is not there"]),
            (class_token_in_the_middle, ["class token in the middle", "ctpmiddle"]),
            (flat_context, ["not shaped as its reference code shapes them"]), (flat_prefix, ["token_prefix is ()"]),
            (number_keys, ["maps names to tensors"]),
            (other_clip, ["another CLIP", "start-of-text"]), (other_vision_tower, ["another CLIP", "patch embedding"]),
            (other_classes, ["24 classes", "47"]),
            (deeper_than_clip, ["does not hold maple's prompts", "depth"]),
            (diverged, ["not finite", "ctx"]), (not_a_checkpoint, ["cannot read", "as a PyTorch checkpoint"]),
            (no_method_code, ["no reference code", "coop, kgcoop, maple, promptsrc"]),
            (two_checkpoints, ["holds 2 checkpoints", "give the file"])]


@pytest.mark.parametrize("case, needles", refusal_cases(), ids=lambda c: getattr(c, "__name__", ""))
def test_what_is_not_the_methods_checkpoint_is_refused(case, needles, frozen_tiny, tiny_clip, synth_root, tmp_path):
    path, method, extra = case(frozen_tiny, tmp_path / "out/seed1")
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", path, method, "--shots", "16", *extra))
    assert_one_line(r, *needles)
    assert not (tmp_path / "runs").exists()


def test_a_path_without_seed_asks_for_it(frozen_tiny, tiny_clip, synth_root, tmp_path):
    path = save_reference(tmp_path / "mine", reference_state("coop", frozen_tiny))
    assert_one_line(cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", path, "coop")), "--seed")


def test_import_over_another_run_is_refused(frozen_tiny, tiny_clip, synth_root, tmp_path):
    first = save_reference(tmp_path / "a/seed1", reference_state("coop", frozen_tiny))
    second = save_reference(tmp_path / "b/seed1", reference_state("coop", frozen_tiny, n_ctx=3))
    assert cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", first, "coop", "--shots", "16")).returncode == 0
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", second, "coop", "--shots", "16"))
    assert_one_line(r, "holds another run", "method.n_ctx")



def test_a_folder_of_reference_runs_is_imported_and_tested_run_by_run(frozen_tiny, tiny_clip, synth_root, tmp_path):
    """The reference's output tree (dataset, shots and seed in each path): every run imported and tested on base and
    novel; a damaged one is listed and the others go on."""
    tree = tmp_path / "output/base2new/train_base/dtd/shots_16/CoOp/vit_b16_ep50_ctxv1"
    for seed in (1, 2):
        save_reference(tree / f"seed{seed}", reference_state("coop", frozen_tiny), epoch=50)
    (tree / "seed3/prompt_learner").mkdir(parents=True)
    (tree / "seed3/prompt_learner/model.pth.tar-50").write_bytes(b"truncated")
    r = cli("import", tmp_path / "output", "--method", "coop", "--root", synth_root, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--device", "cpu", "--workers", "0", "--eval")
    assert r.returncode == 1, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "seed3" in failed[0] and "cannot read" in failed[0], r.stderr
    for seed in (1, 2):
        run = tmp_path / f"runs/dtd/coop/b2n_shots16/seed{seed}"
        assert {p.name for p in run.glob("results_*.json")} == {"results_base.json", "results_novel.json"}
    assert not (tmp_path / "runs/dtd/coop/b2n_shots16/seed3").exists()
    assert r.stderr.count("Base ") == 2  # each run's Base / Novel / HM line


@pytest.mark.parametrize("saved", sorted(PLACES))
def test_no_method_reads_another_methods_checkpoint(saved, frozen_tiny):
    """A checkpoint is read only by its own method. Read by another, a CoCoOp meta-net or PromptSRC's visual prompts
    would be dropped without a word, and CoOp's weights would be reported as KgCoOp's."""
    state = reference_state(saved, frozen_tiny)
    for method in sorted(PLACES):
        if method == saved:
            method_class(method).from_reference(state)
        else:
            with pytest.raises(UserError, match="not a (whole )?checkpoint of"):
                method_class(method).from_reference(state)


@pytest.mark.parametrize("method, n_ctx, prompt, kept", [
    ("coop", 2, "a photo", ""),  # CoOp sets the context's length to its init words': nothing stays
    ("coop", 2, "X X", ""),  # a random start
    ("maple", 2, "a photo of a", "a photo of a"),  # MaPLe's own: "a photo" learnt, "of a {class}." kept
    ("maple", 2, "X X", ""),  # MaPLe started at random: nothing kept
])
def test_the_saved_class_prompts_say_which_words_follow_the_context(method, n_ctx, prompt, kept, frozen_tiny,
                                                                     tiny_clip, synth_root, tmp_path):
    folder = tmp_path / "seed1"
    save_reference(folder, reference_state(method, frozen_tiny, n_ctx=n_ctx, prompt=prompt),
                   name=SAVED_AS.get(method, "prompt_learner"))
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", folder, method, "--shots", "16"))
    assert r.returncode == 0, r.stderr
    model, info = imported_model(tmp_path / "runs/dtd" / method / "b2n_shots16/seed1")
    assert info["config"]["method"]["ctx_init"] == kept and info["config"]["method"]["n_ctx"] == n_ctx
    words = prompt.split()[n_ctx:] if kept else []
    assert model.text.suffix_template == " ".join([*words, "{}."])


def test_a_linked_run_is_read_by_the_path_given(frozen_tiny, tiny_clip, synth_root, tmp_path):
    save_reference(tmp_path / "real/shots_16/seed1", reference_state("coop", frozen_tiny))
    (tmp_path / "view/dtd/shots_4").mkdir(parents=True)
    (tmp_path / "view/dtd/shots_4/seed9").symlink_to(tmp_path / "real/shots_16/seed1")
    r = cli("import", tmp_path / "view", "--method", "coop", "--root", synth_root, "--clip", tiny_clip[0],
            "--pretrained", tiny_clip[1], "--output", tmp_path / "runs", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs/dtd/coop/b2n_shots4/seed9/prompt.safetensors").is_file()


def test_class_specific_context_is_tested_on_its_own_classes(frozen_tiny, tiny_clip, synth_root, tmp_path):
    save_reference(tmp_path / "seed1", reference_state("coop", frozen_tiny, csc=True), epoch=50)
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", tmp_path / "seed1", "coop", "--shots", "16",
                         "--eval", "--workers", "0"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs/dtd/coop/b2n_shots16/seed1"
    assert json.loads((run / "run.json").read_text())["config"]["method"]["csc"] is True
    assert [p.name for p in run.glob("results_*.json")] == ["results_base.json"] and "own classes only" in r.stderr


def test_a_checkpoint_in_torchs_old_format_is_read(frozen_tiny, tiny_clip, synth_root, tmp_path):
    (tmp_path / "seed1/prompt_learner").mkdir(parents=True)
    torch.save({"state_dict": reference_state("coop", frozen_tiny), "epoch": 50},
               tmp_path / "seed1/prompt_learner/model.pth.tar-50", _use_new_zipfile_serialization=False)
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", tmp_path / "seed1", "coop", "--shots", "16"))
    assert r.returncode == 0, r.stderr


def test_a_clip_with_gelu_is_refused(frozen_tiny, tiny_clip, synth_root, tmp_path):
    """The same weights in a GELU config: every reference runs OpenAI's CLIP, whose blocks use QuickGELU."""
    gelu = tmp_path / "gelu-clip.json"
    gelu.write_text(json.dumps({k: v for k, v in json.loads(Path(tiny_clip[0]).read_text()).items() if k != "quick_gelu"}))
    path = save_reference(tmp_path / "seed1", reference_state("coop", frozen_tiny))
    r = cli(*import_args((gelu, tiny_clip[1]), synth_root, tmp_path / "runs", path, "coop", "--shots", "16"))
    assert_one_line(r, "QuickGELU", "-quickgelu")


def test_a_damaged_import_is_written_again(frozen_tiny, tiny_clip, synth_root, tmp_path):
    path = save_reference(tmp_path / "seed1", reference_state("coop", frozen_tiny))
    args = import_args(tiny_clip, synth_root, tmp_path / "runs", path, "coop", "--shots", "16")
    assert cli(*args).returncode == 0
    weights = tmp_path / "runs/dtd/coop/b2n_shots16/seed1/prompt.safetensors"
    before = {k: v.clone() for k, v in load_tensors(weights)[0].items()}
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0x10]))
    r = cli(*args)
    assert r.returncode == 0 and "already holds" not in r.stderr, r.stderr
    after = load_tensors(weights)[0]  # checked again on read
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("tokens", [10, 77])
def test_class_prompts_of_another_length_are_refused(tokens, frozen_tiny, tiny_clip, synth_root, tmp_path):
    state = reference_state("coop", frozen_tiny)
    suffix = state["token_suffix"]
    state["token_suffix"] = torch.cat([suffix, suffix], 1)[:, :tokens]
    path = save_reference(tmp_path / "seed1", state)
    r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", path, "coop", "--shots", "16"))
    assert_one_line(r, f"holds {tokens} tokens per class", "leaves 72")


def test_half_and_bfloat16_prompts_are_read_at_their_precision(frozen_tiny, tiny_clip, synth_root, tmp_path):
    for dtype, seed in ((torch.float16, 1), (torch.bfloat16, 2)):
        path = save_reference(tmp_path / f"seed{seed}", reference_state("coop", frozen_tiny, dtype=dtype))
        r = cli(*import_args(tiny_clip, synth_root, tmp_path / "runs", path, "coop", "--shots", "16"))
        assert r.returncode == 0, r.stderr
