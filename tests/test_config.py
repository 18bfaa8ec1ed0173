"""Method configs: typed defaults from the method file, user file and --set overrides, bad keys and values refused."""

from __future__ import annotations

import pytest

from conftest import assert_one_line, cli
from mugcp.core.errors import UserError
from mugcp.trainer.config import load_config
from mugcp.trainer.methods import available_methods, method_class
from mugcp.trainer.methods.base import OptimConfig
from mugcp.trainer.train import cosine_lr


def test_every_trained_method_has_a_full_schedule_and_typed_options():
    methods = available_methods()
    assert {"mugcp", "coop", "cocoop", "kgcoop", "maple", "promptsrc", "gpt", "zeroshot"} <= set(methods)
    for m in methods:
        cfg = load_config(m)
        assert cfg.method == method_class(m).Config()  # the method file's defaults, nothing else
        if method_class(m).trains:
            assert cfg.optim == OptimConfig(**method_class(m).schedule)
            for key in ("epochs", "lr", "batch_size", "warmup_epochs", "warmup_lr", "momentum", "weight_decay"):
                assert getattr(cfg.optim, key) is not None, (m, key)
        else:
            assert cfg.optim is None


def test_reference_schedules():
    """The reference repositories' base-to-novel settings (ViT-B/16)."""
    expected = {"coop": (200, 0.002, 32), "cocoop": (10, 0.002, 1), "maple": (5, 0.0035, 4),
                "kgcoop": (100, 0.002, 128), "promptsrc": (20, 0.0025, 4)}
    for m, (epochs, lr, batch) in expected.items():
        optim = load_config(m).optim
        assert (optim.epochs, optim.lr, optim.batch_size) == (epochs, lr, batch), m
    assert load_config("maple").method.n_ctx == 2 and load_config("maple").method.depth == 9
    assert load_config("kgcoop").method.w == 8.0
    # PromptSRC's configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml
    src = load_config("promptsrc").method
    assert (src.n_ctx, src.n_ctx_vision, src.depth_text, src.depth_vision, src.ctx_init) == (4, 4, 9, 9, "a photo of a")
    assert (src.w_text, src.w_image, src.gpa_mean, src.gpa_std) == (25, 10, 15, 1)


def test_overrides_and_user_file(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("optim:\n  lr: 0.01\nmethod:\n  fusion: input\n")
    cfg = load_config("mugcp", user, ["optim.epochs=3", "method.w_image=0"])
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 3 and cfg.method.fusion == "input"
    assert cfg.method.w_image == 0.0
    assert load_config("mugcp").optim.lr != 0.01  # defaults are not mutated


@pytest.mark.parametrize("bad, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["nonsense"], "must look like section.key=value"),
    (["method=3"], "method: Input should be a valid dictionary"),
    (["optim.epochs=abc"], "optim.epochs: Input should be a valid integer"),
    (["optim.epochs=0"], "optim.epochs: Input should be greater than or equal to 1"),
    (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["method.fusion=both"], "method.fusion: Input should be 'feature' or 'input'"),
    (["optim.precision=fp8"], "optim.precision"),
    (["optim.precision=fp16", "optim.lr=1e5"], "holds numbers up to 65504"),
    (["conditions.scp=noise"], "conditions.scp: Input should be 'real', 'shuffled' or 'zeros'"),
    (["conditions.scpp=zeros"], "unknown config key 'conditions.scpp'"),
    (["method.gate_init=x"], "method.gate_init: Input should be a valid number"),
    (["optim.epochs=true"], r"optim.epochs: wants a number, not true/false \(got True\)"),
    (["optim.lr=false"], "optim.lr: wants a number, not true/false"),
    (["optim=[1,2]"], r"--set optim=\[1,2\] does not fit the config's shape"),
    (["method.n_ctx=${nowhere}"], "config key 'method.n_ctx': Interpolation key 'nowhere' not found"),
    (["method.n_ctx=${oc.env:MUGCP_NOT_SET_ANYWHERE}"], "'MUGCP_NOT_SET_ANYWHERE' not found"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(UserError, match=message):
        load_config("mugcp", None, bad)


def test_a_beta_that_float32_cannot_draw_is_refused():
    """GPT's mixup draws Beta(alpha, alpha) in float32: 0 means no mixup, a positive alpha float32 rounds to 0
    would stop the run mid-way with a traceback."""
    with pytest.raises(UserError, match="method.mixup_alpha: .*give 0 .* or at least 1.18e-38"):
        load_config("gpt", None, ["method.mixup_alpha=1e-300"])
    assert load_config("gpt", None, ["method.mixup_alpha=0"]).method.mixup_alpha == 0
    assert load_config("gpt", None, ["method.mixup_alpha=1e-30"]).method.mixup_alpha == 1e-30


def test_conditions_section_only_for_methods_that_read_conditions():
    """The SCP controls are config keys of the methods that read SCP, refused on the others."""
    cfg = load_config("mugcp", None, ["conditions.scp=shuffled", "method.amg=false", "method.mpf=false"])
    assert cfg.conditions.scp == "shuffled" and cfg.to_dict()["conditions"] == {"scp": "shuffled", "prompt": None,
                                                                              "k": None}
    assert not cfg.method.amg and not cfg.method.mpf
    assert load_config("mugcp").conditions.scp == "real"
    assert load_config("coop").conditions is None and "conditions" not in load_config("coop").to_dict()
    with pytest.raises(UserError, match=r"unknown config key 'conditions' .*\(known: method, optim\)"):
        load_config("coop", None, ["conditions.scp=zeros"])
    shown = cli("config", "show", "mugcp").stdout
    assert "conditions:" in shown and "scp: real  # SCP as extracted" in shown


def test_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="unknown method 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config("mugcp", bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config("mugcp", tmp_path / "none.yaml")
    with pytest.raises(UserError, match="is a folder, not a YAML file"):
        load_config("mugcp", tmp_path)


def test_config_show_prints_the_effective_config():
    r = cli("config", "show", "maple", "--set", "optim.epochs=7")
    assert r.returncode == 0, r.stderr
    assert "epochs: 7  # training epochs" in r.stdout and "depth: 9  # prompted layers" in r.stdout
    assert r.stdout.index("optim:") < r.stdout.index("method:")
    assert_one_line(cli("config", "show", "maple", "--set", "optim.epochs=x"), "optim.epochs")
    listed = cli("config", "list").stdout
    assert all(m in listed for m in ("coop", "mugcp", "promptsrc", "zeroshot"))
    r = cli("config", "show", "promptsrc")
    assert r.returncode == 0 and "gpa_mean: 15.0  # mean epoch" in r.stdout and "lr: 0.0025" in r.stdout
    r = cli("config", "show", "promptsrc", "--protocol", "fewshot", "--dataset", "dtd")  # the few-shot yaml, DTD's GPA
    assert r.returncode == 0 and "gpa_mean: 45.0  # mean epoch" in r.stdout and "epochs: 50" in r.stdout, r.stdout
    r = cli("config", "show", "maple", "--protocol", "transfer")
    assert r.returncode == 0 and "depth: 3  # prompted layers" in r.stdout and "lr: 0.0026" in r.stdout, r.stdout
    r = cli("config", "show", "coop", "--protocol", "transfer")  # the papers' source, ImageNet: CoOp's 50 epochs
    assert r.returncode == 0 and "epochs: 50  # training epochs" in r.stdout, r.stdout
    assert_one_line(cli("config", "show", "promptsrc", "--protocol", "fewshot"), "needs --dataset")
    assert_one_line(cli("config", "show", "coop", "--protocol", "fewshot", "--dataset", "nope"),
                    "unknown dataset 'nope'")


def test_schedule_is_constant_warmup_then_cosine():
    lrs = [cosine_lr(e, 0.002, 10, 1, 1e-5) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] > 0  # the cosine runs over `epochs` from the warm-up's end, as in Dassl
