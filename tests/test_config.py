"""Method configs: defaults from YAML, user file and --set overrides, unknown keys refused."""

from __future__ import annotations

import pytest

from mugcp.errors import UserError
from trainer.config import available_methods, load_config
from trainer.run import cosine_lr


def test_every_method_has_a_config_with_optim_and_method_sections():
    methods = available_methods()
    assert "mugcp" in methods
    for m in methods:
        cfg = load_config(m)
        assert {"optim", "method"} <= set(cfg)
        for key in ("epochs", "lr", "batch_size", "warmup_epochs", "warmup_lr", "momentum", "weight_decay"):
            assert key in cfg["optim"], (m, key)


def test_overrides_and_user_file(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("optim:\n  lr: 0.01\n")
    cfg = load_config("mugcp", user, ["optim.epochs=3"])
    assert cfg["optim"]["lr"] == 0.01 and cfg["optim"]["epochs"] == 3
    assert load_config("mugcp")["optim"]["lr"] != 0.01  # defaults are not mutated


@pytest.mark.parametrize("bad, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["nonsense"], "must look like section.key=value"),
    (["method=3"], "must be a mapping"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(UserError, match=message):
        load_config("mugcp", None, bad)


def test_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="unknown method 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config("mugcp", bad)


def test_schedule_is_constant_warmup_then_cosine():
    lrs = [cosine_lr(e, 0.002, 10, 1, 1e-5) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] > 0  # the cosine runs over `epochs` from the warm-up's end, as in Dassl
