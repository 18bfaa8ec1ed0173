"""CLIP surgery and the methods: exact equalities with open_clip, zero-init, masks, learning, batching."""

from __future__ import annotations

import re
import statistics

import pytest
import torch
from torch import nn

from mugcp.core.errors import UserError
from mugcp.core.frozen_clip import encode_text
from mugcp.trainer.config import load_config
from mugcp.trainer.methods import build_method
from mugcp.trainer.methods.base import TrainingShots
from mugcp.trainer.surgery import PromptedText, encode_image, init_context

NAMES = ["banded", "zig_zag", "polka-dotted", "woven", "honeycombed"]


@pytest.fixture(scope="module")
def images(frozen_tiny):
    torch.manual_seed(0)
    return torch.randn(4, 3, frozen_tiny.image_size, frozen_tiny.image_size)


def make(name, frozen, classnames=NAMES, **overrides):
    cfg = load_config(name).method.model_copy(update=overrides)
    torch.manual_seed(0)
    return build_method(name, frozen, classnames, "dtd", cfg)


def shots(features, labels, classnames=NAMES):
    """The training shots a method sees in `on_train_start`, with given frozen features."""
    return TrainingShots([], labels, classnames, lambda: features)


def conditions_of(m, scp, mask):
    return {"scp": scp, "scp_mask": mask} if "scp" in m.reads else {}


def scp_inputs(b=4, k=8, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, k, generator=g) > 0.3
    mask[0] = False  # an image without any usable phrase
    return torch.randn(b, k, d, generator=g), mask


# -- surgery ----------------------------------------------------------------------------------------

def test_surgery_without_prompts_is_open_clip(frozen_tiny, images):
    model = frozen_tiny.model
    assert torch.equal(encode_image(frozen_tiny, images), model.encode_image(images))
    text = PromptedText(frozen_tiny, NAMES, n_ctx=4)
    ctx, suffix = init_context(frozen_tiny, 4, "a photo of a")
    assert suffix == "{}."
    ref = model.encode_text(frozen_tiny.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    assert torch.allclose(text(ctx), ref, atol=1e-5)


def test_class_specific_contexts_start_as_coop_draws_them(frozen_tiny):
    """CoOp's CSC: a random start is one (classes, n_ctx, width) N(0, 0.02) draw, so every class starts
    from its own context; init words start every class from the same words."""
    torch.manual_seed(0)
    drawn = make("coop", frozen_tiny, csc=True, n_ctx=16, ctx_init="").ctx.detach()
    assert drawn.shape == (len(NAMES), 16, frozen_tiny.text_width)
    assert all(not torch.equal(drawn[0], drawn[c]) for c in range(1, len(NAMES)))
    assert 0.015 < drawn.std().item() < 0.025
    words = make("coop", frozen_tiny, csc=True).ctx.detach()
    shared, _ = init_context(frozen_tiny, 4, "a photo of a")
    assert words.shape == (len(NAMES), 4, frozen_tiny.text_width)
    assert all(torch.equal(words[c], shared) for c in range(len(NAMES)))
    csc = make("coop", frozen_tiny, csc=True)
    csc.set_classnames(NAMES)  # its own classes: fine
    for other in (NAMES[:-1], ["stripy", *NAMES[1:]], NAMES[::-1]):  # fewer, renamed, reordered: no context fits
        with pytest.raises(UserError, match="cannot be evaluated on other classes"):
            csc.set_classnames(other)


def test_prompts_change_features_and_replace_per_layer(frozen_tiny, images):
    text = PromptedText(frozen_tiny, NAMES, n_ctx=4)
    ctx, _ = init_context(frozen_tiny, 4, "a photo of a")
    base = text(ctx)
    assert (text(ctx + 0.1 * torch.randn_like(ctx)) - base).abs().max() > 1e-3
    deep = [torch.randn(4, ctx.shape[1]) * 0.02 for _ in range(2)]
    with_deep = text(ctx, deep)
    assert (with_deep - base).abs().max() > 1e-3
    deep2 = [deep[0], torch.randn(4, ctx.shape[1])]
    assert (text(ctx, deep2) - with_deep).abs().max() > 1e-4  # the layer-2 prompt is really used
    seen = []

    def hook(i, tokens):
        seen.append(tokens.shape[1])
        return torch.randn(1, 2, tokens.shape[-1]) if i < 2 else None

    prompted = encode_image(frozen_tiny, images, hook)
    assert seen == [17, 17, 17]  # the hook sees the visual tokens only (1 + 4x4 patches)
    assert (prompted - encode_image(frozen_tiny, images)).abs().max() > 1e-4


def test_hooked_surgery_equals_an_explicit_block_by_block_pass(frozen_tiny, images):
    """The forward hooks compute exactly MaPLe's reference recipe, written out here over open_clip's modules."""
    model = frozen_tiny.model
    visual = model.visual
    torch.manual_seed(1)
    width = visual.conv1.out_channels
    prompts = [torch.randn(2, width), torch.randn(2, width)]  # layers 0 and 1; layer 2 keeps layer 1's
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], 1) + visual.positional_embedding
    n = x.shape[1]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], 1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :n], prompts[i].expand(len(x), -1, -1)], 1)
        x = block(x)
    expected = visual.ln_post(x[:, 0]) @ visual.proj
    got = encode_image(frozen_tiny, images, lambda i, t: prompts[i][None] if i < len(prompts) else None)
    assert torch.allclose(got, expected, atol=1e-6)

    text = PromptedText(frozen_tiny, NAMES, n_ctx=4)
    ctx, _ = init_context(frozen_tiny, 4, "a photo of a")
    deep = [torch.randn(4, ctx.shape[1]) * 0.1]
    h = torch.cat([text.prefix, ctx.expand(len(NAMES), -1, -1), text.suffix], 1)
    h = h + model.positional_embedding[: h.shape[1]]
    mask = model.attn_mask[: h.shape[1], : h.shape[1]]
    for i, block in enumerate(model.transformer.resblocks):
        if i == 1:
            h = torch.cat([h[:, :1], deep[0].expand(len(NAMES), -1, -1), h[:, 5:]], 1)
        h = block(h, attn_mask=mask)
    h = model.ln_final(h)
    expected = h[torch.arange(len(NAMES)), text.tokens.argmax(-1)] @ model.text_projection
    assert torch.allclose(text(ctx, deep), expected, atol=1e-6)
    assert not model.transformer.resblocks[1]._forward_pre_hooks  # hooks live for one call only
    assert not visual.patch_dropout._forward_hooks


def test_coop_untrained_equals_handcrafted_prompt(frozen_tiny, images):
    coop = make("coop", frozen_tiny)
    ref = frozen_tiny.model.encode_text(frozen_tiny.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    assert torch.allclose(coop.class_features(), ref, atol=1e-5)


def test_maple_without_prompts_is_plain_clip(frozen_tiny, images):
    maple = make("maple", frozen_tiny, depth=0, n_ctx=4)
    model = frozen_tiny.model
    text = model.encode_text(frozen_tiny.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    image = model.encode_image(images)
    plain = maple.cosine_logits(image, text)
    assert torch.allclose(maple(images), plain, atol=1e-4)
    # the reference's quirk: n_ctx 2 learns "a photo" and keeps "of a {class}." as text
    maple2 = make("maple", frozen_tiny, depth=0)
    assert maple2.text.suffix_template == "of a {}."
    assert torch.allclose(maple2(images), plain, atol=1e-4)
    assert (make("maple", frozen_tiny)(images) - plain).abs().max() > 1e-3


def test_maple_starts_where_the_reference_starts(frozen_tiny):
    """From the same random state, the reference's prompt learner draws, written out in its order, give our weights."""
    maple = make("maple", frozen_tiny)  # seeded 0 before construction
    n_ctx, depth = maple.config.n_ctx, maple.depth
    d_t, d_v = frozen_tiny.text_width, frozen_tiny.vision_width
    torch.manual_seed(0)
    proj = nn.Linear(d_t, d_v)
    compound_prompts_text = [torch.empty(n_ctx, d_t) for _ in range(depth - 1)]
    for p in compound_prompts_text:
        nn.init.normal_(p, std=0.02)
    single_layer = nn.Linear(d_t, d_v)  # cloned for layers 1..depth-1
    assert depth == 3 and len(maple.to_visual) == depth
    assert torch.equal(maple.to_visual[0].weight, proj.weight) and torch.equal(maple.to_visual[0].bias, proj.bias)
    for ours, theirs in zip(maple.deep_text, compound_prompts_text):
        assert torch.equal(ours, theirs)
    for layer in maple.to_visual[1:]:
        assert torch.equal(layer.weight, single_layer.weight) and torch.equal(layer.bias, single_layer.bias)
    assert maple.to_visual[1].weight is not maple.to_visual[2].weight  # clones, not one shared layer


def test_cocoop_batched_equals_per_image_loop(frozen_tiny, images):
    cocoop = make("cocoop", frozen_tiny)
    with torch.no_grad():
        for p in cocoop.meta_net.parameters():
            p.normal_(0, 0.1)
        batched = cocoop(images)
        looped = torch.cat([cocoop(images[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(batched, looped, atol=1e-5)


# -- MuGCP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", ["feature", "input"])
def test_mugcp_zero_init_ignores_scp_then_learns_to_use_it(frozen_tiny, images, fusion):
    m = make("mugcp", frozen_tiny, fusion=fusion)
    scp, mask = scp_inputs()
    other, _ = scp_inputs(seed=1)
    assert torch.equal(m(images, scp=scp, scp_mask=mask), m(images, scp=other, scp_mask=mask))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    labels = torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(6):
        loss, _ = m.loss(images, labels, scp=scp, scp_mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (m(images, scp=scp, scp_mask=mask) - m(images, scp=other, scp_mask=mask)).abs().max() > 1e-5


def test_mugcp_learns_a_label_that_only_scp_states(frozen_tiny):
    """On `world.scp_task` with one shared image, one phrase in eight is the class's own vector: MuGCP, at its
    configured learning rate for the demo's 240 SGD steps, classifies held-out samples from it, and with SCP
    shuffled across samples (the control) stays at chance; seeds 1-3, means beyond the seeds' spread.
    (bench/scp_pathway.py also shows the other side: with noise images it memorises its shots instead.)"""
    from mugcp.world.scp_task import fit_and_score, scp_task

    lr = load_config("mugcp").optim.lr
    scores = {}
    for shuffled in (False, True):
        scores[shuffled] = []
        for seed in (1, 2, 3):
            train, test = scp_task(len(NAMES), 8, frozen_tiny.image_size, frozen_tiny.model.text_projection.shape[1],
                                   seed, shuffled=shuffled)
            m = make("mugcp", frozen_tiny)
            scores[shuffled].append(fit_and_score(m, train, test, 240, lr, seed=seed)[1])
    real, shuffled = scores[False], scores[True]
    assert statistics.mean(real) - statistics.stdev(real) > statistics.mean(shuffled) + statistics.stdev(shuffled), \
        scores
    assert statistics.mean(shuffled) < 0.4, scores  # chance is 0.2


def test_mugcp_step0_is_the_plain_context_prompt_model(frozen_tiny, images):
    """At init, MuGCP = learnable context + deep text prompts + static visual queries (no SCP path)."""
    m = make("mugcp", frozen_tiny)
    scp, mask = scp_inputs()
    text = m.text(m.ctx, list(m.deep_text))
    image = encode_image(frozen_tiny, images, lambda i, t: m.amg.queries[i][None] if i < m.depth else None)
    assert torch.allclose(m(images, scp=scp, scp_mask=mask), m.cosine_logits(image, text), atol=1e-5)


def test_mugcp_masked_phrases_do_not_matter(frozen_tiny, images):
    m = make("mugcp", frozen_tiny)
    with torch.no_grad():
        m.amg.gates.fill_(1.0)
        m.text_gates.fill_(1.0)
    scp, mask = scp_inputs()
    changed = torch.where(mask[..., None], scp, torch.randn_like(scp) * 5)
    assert torch.allclose(m(images, scp=scp, scp_mask=mask), m(images, scp=changed, scp_mask=mask), atol=1e-5)
    assert (m(images, scp=scp, scp_mask=mask) - m(images, scp=scp, scp_mask=torch.ones_like(mask))).abs().max() > 1e-5


def test_mugcp_input_fusion_guides_every_prompted_text_layer(frozen_tiny, images):
    """fusion: input: layer j's grounded SCP and VCP shift the deep text prompts of layer j (mutual guidance)."""
    m = make("mugcp", frozen_tiny, fusion="input")
    scp, mask = scp_inputs()
    with torch.no_grad():
        m.amg.gates.fill_(1.0)
        m.text_gates.fill_(1.0)
        reference = m(images, scp=scp, scp_mask=mask)
        for layer in range(m.depth):  # closing one layer's gate changes the output: every layer is used
            m.text_gates[layer] = 0.0
            assert (m(images, scp=scp, scp_mask=mask) - reference).abs().max() > 1e-6, layer
            m.text_gates[layer] = 1.0
        _, instance = m.encode_image(images, scp, scp_mask=mask)
        shift = m.fuse(instance)  # (B, depth, d_t)
        expected = m.text(m.ctx + shift[:, 0, None, None], [d[None, None] + shift[:, j + 1, None, None]
                                                            for j, d in enumerate(m.deep_text)])
        assert torch.allclose(m.class_features(instance), expected, atol=1e-6)


def test_mugcp_instance_chunks_change_memory_not_results(frozen_tiny, images):
    scp, mask = scp_inputs()
    labels = torch.tensor([0, 1, 2, 3])
    grads = []
    for chunk in (0, 1, 3):
        m = make("mugcp", frozen_tiny, fusion="input", instance_chunk=chunk, gate_init=0.5)
        loss, logits = m.loss(images, labels, scp=scp, scp_mask=mask)
        loss.backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    for logits, g in grads[1:]:
        assert torch.allclose(logits, grads[0][0], atol=1e-5)
        assert g.keys() == grads[0][1].keys() and all(torch.allclose(g[k], grads[0][1][k], atol=1e-6) for k in g)


def test_mugcp_ablations_remove_their_part(frozen_tiny, images):
    scp, mask = scp_inputs()
    other, _ = scp_inputs(seed=1)

    def depends_on_scp(m):
        with torch.no_grad():
            return (m(images, scp=scp, scp_mask=mask) - m(images, scp=other, scp_mask=mask)).abs().max() > 1e-6

    both_off = make("mugcp", frozen_tiny, amg=False, mpf=False, gate_init=1.0)
    assert not hasattr(both_off, "fuse") and not hasattr(both_off.amg, "guide")
    assert not depends_on_scp(both_off)  # independent deep prompts: SCP is not read at all
    image = encode_image(frozen_tiny, images, lambda i, t: both_off.amg.queries[i][None] if i < both_off.depth else None)
    text = both_off.text(both_off.ctx, list(both_off.deep_text))
    assert torch.allclose(both_off(images, scp=scp, scp_mask=mask), both_off.cosine_logits(image, text), atol=1e-5)
    for options in ({"amg": False}, {"mpf": False}, {"amg": False, "fusion": "input"}):
        m = make("mugcp", frozen_tiny, gate_init=1.0, **options)
        assert depends_on_scp(m), options  # the part left on still reads SCP
    assert not depends_on_scp(make("mugcp", frozen_tiny, amg=False))  # gates at zero: step 0 ignores SCP


def test_methods_learn_only_prompts_and_rebuild_for_novel_classes(frozen_tiny, images):
    labels = torch.tensor([0, 1, 2, 3])
    scp, mask = scp_inputs()
    clip_before = {k: v.clone() for k, v in frozen_tiny.model.state_dict().items()}
    for name in ["coop", "cocoop", "maple", "kgcoop", "gpt", "mugcp", "promptsrc"]:
        m = make(name, frozen_tiny)
        m.on_train_start(shots(torch.randn(10, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])))
        inputs = conditions_of(m, scp, mask)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        losses = []
        for _ in range(8):
            loss, _ = m.loss(images, labels, **inputs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (name, losses)
        state = m.final_state_dict()
        assert state and not any(k.startswith("clip") for k in state)
        m.eval()
        m.set_classnames(["stone", "glass"])
        assert m(images, **inputs).shape == (4, 2)
        fresh = make(name, frozen_tiny)  # rebuilt as trained, then switched to other classes
        fresh.load_final_state(state)
        fresh.set_classnames(["stone", "glass"])
    for k, v in frozen_tiny.model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k


def test_gpt_novel_classes_use_the_handcrafted_feature(frozen_tiny):
    gpt = make("gpt", frozen_tiny)
    gpt.on_train_start(shots(torch.randn(4, 64), torch.tensor([0, 0, 1, 1])))
    gpt.eval()
    gpt.set_classnames(["banded", "never seen"])
    cond = gpt.conditions()
    assert torch.allclose(cond[1], gpt.handcrafted[1])
    assert not torch.allclose(cond[0], gpt.handcrafted[0])


@pytest.mark.parametrize("name", ["coop", "maple", "kgcoop", "gpt", "mugcp", "promptsrc"])
def test_eval_computes_class_features_once_and_never_stale(frozen_tiny, images, name):
    """In eval without gradients one text pass serves every batch; anything that changes the prompts clears it."""
    m = make(name, frozen_tiny)
    m.on_train_start(shots(torch.randn(10, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])))
    scp, mask = scp_inputs()
    inputs = conditions_of(m, scp, mask)
    passes = []
    m.text.register_forward_hook(lambda *_: passes.append(1))
    m.eval()
    with torch.no_grad():
        first = m(images, **inputs)
        again = m(images, **inputs)
        assert len(passes) == 1 and torch.equal(first, again)
        with torch.enable_grad():  # gradients on: no reuse
            m(images, **inputs)
        assert len(passes) == 2

        state = {k: v + 0.05 * torch.randn_like(v) for k, v in m.final_state_dict().items()}
        m.load_final_state(state)
        changed = m(images, **inputs)
        assert len(passes) == 3 and not torch.allclose(changed, first)
        m.train()
        m.eval()
        m(images, **inputs)
        assert len(passes) == 4
        m.set_classnames(["stone", "glass"])
        assert m(images, **inputs).shape == (4, 2) and len(passes) == 5
        fresh = make(name, frozen_tiny)
        fresh.load_final_state(state)
        fresh.set_classnames(["stone", "glass"])
        fresh.eval()
        assert torch.allclose(m(images, **inputs), fresh(images, **inputs), atol=1e-5)


def test_gpt_learns_its_mi_estimator_by_default(frozen_tiny, images):
    """The learnable critic is the default and trains; `critic: false` keeps the fixed cosine estimator."""
    gpt = make("gpt", frozen_tiny)
    assert gpt.config.critic and torch.equal(gpt.critic.weight, torch.eye(frozen_tiny.embed_dim))
    gpt.on_train_start(shots(torch.randn(10, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])))
    opt = torch.optim.SGD([p for p in gpt.parameters() if p.requires_grad], lr=0.01)
    loss, _ = gpt.loss(images, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(gpt.critic.weight, torch.eye(frozen_tiny.embed_dim))
    fixed = make("gpt", frozen_tiny, critic=False)
    assert fixed.critic is None and "critic.weight" not in fixed.learnable_state_dict()


# -- PromptSRC ------------------------------------------------------------------------------------

def test_promptsrc_without_prompts_is_plain_clip(frozen_tiny, images):
    """Only the text context left, at its "a photo of a" start: exactly open_clip's features (text cut at the EOT)."""
    m = make("promptsrc", frozen_tiny, depth_text=1, depth_vision=0)
    assert not list(m.deep_text) and not list(m.vision_prompts)
    model = frozen_tiny.model
    tokens = frozen_tiny.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    assert torch.equal(m.image_features(images), model.encode_image(images))
    assert torch.equal(m.class_features(), encode_text(model, tokens))
    assert torch.allclose(m.class_features(), model.encode_text(tokens), atol=1e-5)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(images), m.cosine_logits(model.encode_image(images), encode_text(model, tokens)))


def test_promptsrc_prompts_are_used_at_every_layer(frozen_tiny, images):
    m = make("promptsrc", frozen_tiny)
    assert len(m.vision_prompts) == 3 and len(m.deep_text) == 2  # depth 9 capped at the tiny model's 3 layers
    assert (m.image_features(images) - frozen_tiny.model.encode_image(images)).abs().max() > 1e-4
    with torch.no_grad():
        for prompts, features in ((m.vision_prompts, lambda: m.image_features(images)),
                                  (m.deep_text, m.class_features)):
            for p in prompts:
                before = features()
                p.add_(torch.randn_like(p))
                assert (features() - before).abs().max() > 1e-4


@pytest.mark.parametrize("name,asked,built", [
    ("maple", {}, {"method.depth": 3}),
    ("maple", {"depth": 2}, {}),
    ("promptsrc", {"depth_vision": 2}, {"method.depth_text": 3}),
    ("mugcp", {}, {"method.depth": 3}),
    ("mugcp", {"depth": 2, "heads": 5}, {"method.heads": 1}),  # 5 heads do not divide the width of 64
    ("coop", {}, {}),
])
def test_depths_beyond_the_clip_are_recorded_as_built(frozen_tiny, name, asked, built):
    """The tiny CLIP has 3 layers: a depth of 9 builds 3 prompted layers, and the run record must say so."""
    model = make(name, frozen_tiny, **asked)
    assert model.as_built == built
    if name == "maple":
        assert len(model.to_visual) == min(model.config.depth, 3)


def test_a_prompt_longer_than_clips_context_is_refused_not_cut(frozen_tiny):
    """open_clip cuts a text at CLIP's context and ends it with EOT: a context of 75 tokens would push every class
    name out of its prompt (all classes alike, silently). The reference's clip.tokenize refuses such a text, and so
    does every method here, for its learnt prompts and its hand-crafted ones."""
    free = frozen_tiny.context_length - 4  # SOT, "x" and "." and EOT
    make("coop", frozen_tiny, ["x", "y"], n_ctx=free, ctx_init="")  # fits
    with pytest.raises(UserError, match=f"class 'y z' after {free} context tokens .* is a prompt of "
                                        f"{frozen_tiny.context_length + 1} tokens, more than CLIP's 77"):
        make("coop", frozen_tiny, ["x", "y z"], n_ctx=free, ctx_init="")
    long_name = " ".join(["word"] * 80)
    for name in ("zeroshot", "kgcoop"):
        with pytest.raises(UserError, match=r"class 'word word .*\.\.\.' in the hand-crafted prompt '.*\{\}.*' is \d+ tokens, more than "
                                                "CLIP's 77: it would lose its class name"):
            make(name, frozen_tiny, ["x", long_name])


def test_init_words_with_braces_stay_text(frozen_tiny):
    m = make("maple", frozen_tiny, ctx_init="a photo of {}")  # MaPLe learns "a photo"
    assert m.text.suffix_template.format("x") == "of {} x."


def test_a_meta_net_without_hidden_units_is_refused(frozen_tiny):
    with pytest.raises(UserError, match=f"meta_ratio=100 leaves the meta-net no hidden unit: .* CLIP's "
                                        f"{frozen_tiny.embed_dim} .* give at most {frozen_tiny.embed_dim}"):
        make("cocoop", frozen_tiny, meta_ratio=100)


@pytest.mark.parametrize("mean, std, weights", [(2, 1, None), (1e200, 1, [0, 0, 1]), (2.5, 1e-200, [0, 0.5, 0.5]),
                                                 (1e308, 1e-300, [0, 0, 1]), (-1e308, 1, [1, 0, 0])])
def test_gaussian_prompt_aggregation_weights_hold_for_any_finite_mean_and_std(mean, std, weights):
    import math

    from mugcp.trainer.methods.promptsrc import gpa_weights

    got = gpa_weights(3, mean, std)
    assert all(math.isfinite(w) and w >= 0 for w in got) and sum(got) == pytest.approx(1)
    if weights is None:  # the formula itself: exp(-(e - 2)^2 / 2), normalised
        raw = [math.exp(-0.5 * (e - 2) ** 2) for e in (1, 2, 3)]
        weights = [w / sum(raw) for w in raw]
    assert got == pytest.approx(weights, abs=1e-15)


def test_a_method_declared_wrongly_is_told_when_it_registers():
    """A method author's mistakes in the class-level declarations are found when the file registers, each named in
    one line, instead of a traceback mid-run (or, for a reused name, a silent replacement of another method)."""
    from pydantic import Field

    from mugcp.trainer.methods import _declaration_problem
    from mugcp.trainer.methods.base import MethodConfig
    from mugcp.trainer.methods.coop import CoOp

    class NoDefault(MethodConfig):
        alpha: float = Field(ge=0)

    cases = [
        (dict(template_table="kgcoopp"), "template_table 'kgcoopp' is none of coop, kgcoop, imagenet60"),
        (dict(reads="scp"), "reads must be a tuple of condition names, e.g. (\"scp\",), not 'scp'"),
        (dict(reads=("spc",)), "it reads 'spc', which is no condition (known: scp)"),
        (dict(Config=NoDefault), "every option of its Config needs a default (the reference's): alpha"),
        (dict(schedule={"epochs": 5}), "its schedule must give the reference's epochs, lr and batch_size (lr, batch_size)"),
    ]
    for attrs, expected in cases:
        assert _declaration_problem("x", type("Wrong", (CoOp,), attrs)) == expected
    assert _declaration_problem("coop", type("Copy", (CoOp,), {})) == (
        "the name 'coop' is registered twice (also by mugcp.trainer.methods.coop)")
    assert _declaration_problem("x", type("Fine", (CoOp,), {})) is None
    assert _declaration_problem("coop", CoOp) is None  # CoOp itself, as it registered
    reloaded = type("CoOp", (CoOp,), {"__module__": CoOp.__module__, "__qualname__": CoOp.__qualname__})
    assert _declaration_problem("coop", reloaded) is None  # the same class read again (a module reloaded)


@pytest.mark.parametrize("broken", ["register", "import"])
def test_a_broken_method_file_stops_method_commands_on_one_line(broken):
    """A method that registers wrongly, or a method file that does not import, makes every command that needs the
    methods exit 2 on one line naming it; commands that need none still work."""
    import subprocess
    import sys

    setup = {"register": "from mugcp.trainer.methods.coop import CoOp\n"
                         "methods.register('coop')(type('Copy', (CoOp,), {}))\n",
             "import": "methods._import_method_file('mugcp_no_such_method_file')\n"}[broken]
    script = ("import sys\nfrom mugcp.trainer import methods\n" + setup +
              "from mugcp.cli import main\nmain(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", script, "config", "show", "coop"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [{
        "register": "error: method 'coop' (__main__): the name 'coop' is registered twice "
                    "(also by mugcp.trainer.methods.coop)",
        "import": "error: method file trainer/methods/mugcp_no_such_method_file.py cannot be imported: "
                  "ModuleNotFoundError: No module named 'mugcp.trainer.methods.mugcp_no_such_method_file'"}[broken]]
    r = subprocess.run([sys.executable, "-c", script, "cache", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_method_whose_outputs_are_not_loss_and_logits_is_stopped_on_one_line():
    """Training and evaluation check what a method returns: a scalar loss its weights move, (images, classes)
    logits; wider logits would otherwise pass cross-entropy and argmax silently as extra classes."""
    from mugcp.trainer.evaluation import evaluate
    from mugcp.trainer.train import check_step

    w = torch.zeros(3, requires_grad=True)
    check_step("m", (w * 2).sum(), torch.zeros(4, 5), 4, 5)  # as it should be: nothing raised
    for loss, logits, told in [((w * 2).sum(), torch.zeros(4, 64), "logits of shape (4, 64) for 4 images of 5 classes"),
                               (torch.tensor(1.0), torch.zeros(4, 5), "a loss of shape () that no learnt weight moves"),
                               ((w * 2), torch.zeros(4, 5), "a loss of shape (3,)")]:
        with pytest.raises(UserError, match=re.escape(told)):
            check_step("m", loss, logits, 4, 5)
    batch = (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]), ["", ""])
    loader = type("Loader", (list,), {"dataset": [0, 1]})([batch])
    assert evaluate(lambda images, index: torch.eye(5)[:2], loader, 5, torch.device("cpu")).accuracy == 100.0
    with pytest.raises(UserError, match=re.escape("logits of shape (2, 7) for 2 images of 5 classes")):
        evaluate(lambda images, index: torch.zeros(2, 7), loader, 5, torch.device("cpu"))


def test_half_precision_keeps_what_the_reference_keeps_in_fp32_exactly(tiny_clip):
    """`optim.precision=fp16` halves CLIP and the parts the reference halves (MaPLe: its context and first projection);
    the parts the reference holds in fp32 keep their fp32 values exactly, never rounded through half."""
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.precision import to_half

    frozen = load_clip(str(tiny_clip[0]), str(tiny_clip[1]))  # its own copy: it is halved here
    maple = make("maple", frozen)
    before = {n: p.detach().clone() for n, p in maple.named_parameters()}
    to_half(frozen.model, maple)
    halved = {"ctx", "to_visual.0.weight", "to_visual.0.bias"}
    for name, p in maple.named_parameters():
        assert torch.equal(p, before[name].half() if name in halved else before[name]), name
    kept = [n for n in before if n not in halved]
    assert kept and any(not torch.equal(before[n], before[n].half().float()) for n in kept)  # half would round them
    assert frozen.dtype == torch.float16


META = torch.device("meta")
META_VARIANTS = [(m, {}) for m in ("coop", "cocoop", "kgcoop", "maple", "promptsrc", "gpt", "mugcp", "zeroshot")] + [
    ("coop", {"csc": True}), ("gpt", {"critic": False}), ("mugcp", {"fusion": "input"}),
    ("mugcp", {"fusion": "input", "instance_chunk": 2}), ("mugcp", {"amg": False, "mpf": False})]


@pytest.fixture
def on_meta(monkeypatch):
    """PyTorch's meta device: tensors without data on a device other than the CPU, so a tensor made on the CPU and
    mixed in raises as it would on a GPU. What needs data is done as on a GPU: the EOT cut (an `.item()`) at the full
    length, boolean-mask indexing (GPT's shots per class) as if every element were kept."""
    import warnings

    import torch.fx.experimental._config as fx_config

    from mugcp.core import frozen_clip

    cut = frozen_clip.cut_length
    monkeypatch.setattr(frozen_clip, "cut_length", lambda t: t.shape[1] if t.is_meta else cut(t))
    with warnings.catch_warnings(), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, options", META_VARIANTS, ids=[f"{m}-{o}" if o else m for m, o in META_VARIANTS])
def test_every_method_keeps_its_tensors_on_the_models_device(on_meta, tiny_clip, name, options, half):
    """No GPU here: on the meta device, training steps, the epoch hooks, final weights read on the CPU (as `mugcp
    eval` reads them) and evaluation on other classes keep every tensor where the model is, in fp32 and in the
    references' half precision."""
    from mugcp.core.frozen_clip import load_clip
    from mugcp.trainer.precision import to_half

    frozen = load_clip(str(tiny_clip[0]), str(tiny_clip[1]), device=META)  # as a run loads it on its device
    torch.manual_seed(0)
    model = build_method(name, frozen, NAMES, "dtd", load_config(name).method.model_copy(update=options)).to(META)
    saved = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.final_state_dict().items()}
    if half:
        to_half(frozen.model, model)
    b, d = 4, frozen.embed_dim
    images = torch.empty(b, 3, frozen.image_size, frozen.image_size, device=META, dtype=frozen.dtype)
    labels = torch.empty(b, dtype=torch.long, device=META)
    given = ({"scp": torch.empty(b, 8, d, device=META, dtype=frozen.dtype),
              "scp_mask": torch.empty(b, 8, dtype=torch.bool, device=META)} if "scp" in model.reads else {})
    model.on_train_start(TrainingShots([], torch.empty(10, dtype=torch.long, device=META), NAMES,
                                       lambda: torch.empty(10, d, device=META, dtype=frozen.dtype)))
    for epoch in range(2):
        model.train()
        if model.trains:
            loss, logits = model.loss(images, labels, **given)
            assert logits.shape == (b, len(NAMES)) and logits.is_meta
            loss.backward()
        model.on_epoch_end(epoch, 2)
    assert all(v.is_meta for v in model.final_state_dict().values())
    model.load_final_state(saved)
    model.eval()
    with torch.no_grad():
        assert model(images, **given).shape == (b, len(NAMES))
        if not options.get("csc"):  # class-specific context cannot move to other classes
            model.set_classnames(NAMES[1:] + ["stripy", "plaid"])
            assert model(images, **given).shape == (b, len(NAMES) + 1)
