"""Prompt-to-prompt, Direct Inversion and InfEdit on the attention-control mechanism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffedit.denoiser import prompt_denoiser
from diffedit.editing.attention import AttnCall, _attend, attention_maps
from diffedit.editing.p2p import LocalBlend, P2PConfig, PromptToPrompt, align, build_p2p
from diffedit.errors import UsageError
from diffedit.guidance.cfg import CFG
from diffedit.jobs import edit_record, invert_image
from diffedit.plan import plan_job, plan_of_record
from diffedit.sampling import initial_noise, sample


def test_alignment_word_swap_and_refine(tiny):
    pipe, _ = tiny("sd1")
    tok = pipe.tokenizer
    mapper, alphas, swapped = align(tok, "a red square", "a blue square", "auto", 77)  # equal counts: word swap
    assert torch.equal(mapper, torch.arange(77)) and alphas.min() == 1
    assert swapped.nonzero().flatten().tolist() == [2]  # "blue", after the start token and "a"
    mapper, alphas, swapped = align(tok, "a red square", "a big red square", "auto", 77)  # refine
    # "a"->1, "big" is new, "red"->2, "square"->3, end token 5 -> 4
    assert mapper[1] == 1 and alphas[2] == 0 and mapper[3] == 2 and mapper[4] == 3 and mapper[5] == 4
    assert not swapped.any()  # a new word keeps its own map on every step
    with pytest.raises(UsageError, match="equal token counts"):
        align(tok, "a red square", "a big red square", "replace", 77)


def test_self_attention_replacement_takes_the_source_maps_over_the_targets_values():
    """In active steps and layers of at most `self_max_tokens` queries, each image's conditional target
    row attends with its source's maps over its own values; unconditional rows and later steps, larger
    layers keep their own."""
    images, tokens = 2, 16
    control = PromptToPrompt(P2PConfig(self_=0.5, self_max_tokens=tokens), 10, (4, 4), torch.stack([torch.arange(5)] * 2),
                             torch.ones(images, 5), torch.zeros(images, 5, dtype=torch.bool))
    q, k, v = (torch.randn(2 * 2 * images, 2, tokens, 8) for _ in range(3))  # uncond, cond: [sources, targets]
    own = F.scaled_dot_product_attention(q, k, v)

    def attend(step, image_tokens=tokens):
        control.begin(step, ("uncond", "cond"))
        call = AttnCall("down_blocks.0.attentions.0.transformer_blocks.0.attn1", False, image_tokens, False, step,
                        ("uncond", "cond"))
        return _attend(control, call, q, k, v)

    out = attend(step=4)
    for image in range(images):
        source, target = 2 * images + image, 3 * images + image
        assert torch.allclose(out[target], attention_maps(q[source], k[source]) @ v[target], atol=1e-5)
        assert torch.allclose(out[source], own[source], atol=1e-6)
    assert torch.allclose(out[: 2 * images], own[: 2 * images], atol=1e-6)  # the unconditional chunk
    assert torch.allclose(attend(step=5), own, atol=1e-6)  # past the self_ fraction of 10 steps
    assert torch.allclose(attend(step=0, image_tokens=4 * tokens), own, atol=1e-6)  # a larger layer


def test_swapped_words_borrow_the_source_map_for_their_own_fraction_of_steps(tiny):
    """A word swap with cross 0.8 and cross_edited 0.3 over 10 steps: the target's swapped token takes
    the source's map on steps 0-2 only, every other token on steps 0-7, none from step 8."""
    pipe, _ = tiny("sd1")
    control = build_p2p(pipe.tokenizer, [("a red square", "a blue square")], P2PConfig(cross=0.8, cross_edited=0.3),
                        10, (4, 4))
    probs = torch.rand(4, 2, 16, 77).softmax(-1)  # uncond [source, target], cond [source, target]

    def borrowed(step):
        control.begin(step, ("uncond", "cond"))
        call = AttnCall("down_blocks.0.attentions.0.transformer_blocks.0.attn2", True, 16, False, step, ("uncond", "cond"))
        assert control.wants_maps(call) == (step < 8)
        out = control.maps(call, probs.clone()) if control.wants_maps(call) else probs
        return [bool(torch.equal(out[3, :, :, t], probs[2, :, :, t])) for t in range(4)]  # start, a, blue, square

    assert borrowed(2) == [True, True, True, True]
    assert borrowed(3) == [True, True, False, True]
    assert borrowed(7) == [True, True, False, True]
    assert borrowed(8) == [False, False, False, False]


def test_local_blend_keeps_the_source_outside_the_mask():
    blend = LocalBlend([[1], []], (4, 4), threshold=0.5)
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1, 0, 0] = 1.0  # the blend word attends to one corner only
    blend.add(maps)
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    out = blend.apply(x)
    assert out[1, 0, 3, 3] == 0.0  # far from the word: the source
    assert out[1, 0, 0, 0] == 1.0  # where the word attends: the target


@pytest.mark.parametrize("engine", ["direct", "infedit"])
def test_same_prompt_reconstructs_exactly(tiny, square, engine):
    _, model = tiny("sd1")
    record, result = invert_image(model, square, plan_job(model, engine=engine, steps=10), prompt="a red square")
    assert result["latent_max_abs"] <= 1e-4
    assert result["psnr"] == pytest.approx(result["vae_psnr"], abs=1e-6)
    # an edit whose target is the source, at the edit's own guidance, is the identity too
    image, _ = edit_record(model, record, "a red square", plan_of_record(model, record.meta, edit=True, guidance_scale=7.5))
    decoded_input = np.asarray(Image.open(square))
    assert np.abs(np.asarray(image).astype(int) - decoded_input).max() < 256  # a real image came back
    z_back = model.encode_image(torch.from_numpy(np.asarray(image) / 127.5 - 1).permute(2, 0, 1)[None].float())
    assert torch.isfinite(z_back).all()


def test_edits_change_the_target_and_leave_the_model_clean(tiny, square):
    pipe, model = tiny("sd1")
    before = dict(pipe.unet.attn_processors)
    denoise = prompt_denoiser(model, ["a red square"], CFG(3.0), 32, 32)
    x = initial_noise(model.latent_shape(1, 32, 32), [0], model.device)
    reference = sample(denoise, x, model.schedule(4, 32, 32))
    images = {}
    for engine in ("ddim", "ddim-p2p", "direct", "infedit"):
        record, _ = invert_image(model, square, plan_job(model, engine=engine, steps=8), prompt="a red square")
        images[engine], result = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, guidance_scale=5.0))
        assert result["nfe"] == 8
    assert not np.array_equal(np.asarray(images["ddim"]), np.asarray(images["ddim-p2p"]))
    assert pipe.unet.attn_processors == before
    again = sample(prompt_denoiser(model, ["a red square"], CFG(3.0), 32, 32), x, model.schedule(4, 32, 32))
    assert torch.equal(again, reference)  # bit-identical after every engine


def test_local_blend_ignores_the_attention_floor():
    """A word that gets some attention everywhere (a floor of 0.5) and more at one spot (0.6): the mask
    is the spot, not the whole grid as normalising by the peak alone made it."""
    blend = LocalBlend([[1]], (6, 6), threshold=0.3)
    maps = torch.full((1, 3, 6, 6), 0.5)
    maps[0, 1, 2, 2] = 0.6
    blend.add(maps)
    mask = blend.take_mask()[0, 0]
    assert mask[1:4, 1:4].all() and mask.sum() == 9  # the spot, dilated by one cell


def test_reweight_and_blend_change_the_edit(tiny, square):
    _, model = tiny("sd1")
    record, _ = invert_image(model, square, plan_job(model, engine="direct", steps=8), prompt="a red square")
    plain, _ = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True))
    heavy, _ = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, params={"reweight": {"blue": 4.0}}))
    # a high threshold leaves part of the image outside the mask (random weights attend everywhere)
    blended, _ = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, params={"blend": ["square"], "blend_threshold": 0.95}))
    assert not np.array_equal(np.asarray(plain), np.asarray(heavy))
    assert not np.array_equal(np.asarray(plain), np.asarray(blended))


@pytest.mark.parametrize("engine,target,params,message", [
    ("direct", "a " + "red " * 80 + "square", {}, "target prompt has 84 tokens; the model takes at most 77"),
    ("direct", "a blue square", {"reweight": {"green": 2.0}}, "word 'green' is not in the target prompt"),
    ("infedit", "a blue square", {"blend": ["zebra"]}, "blend word 'zebra' is in neither"),
    ("direct", "a blue square", {"cross_replace": 1.5}, "--cross-replace 1.5"),
    ("ddim-p2p", "a blue square", {"cross_replace_edited": -0.1}, "--cross-replace-edited -0.1 must be in"),
    ("infedit", "a blue square", {"cross_replace_edited": 0.5}, "--cross-replace-edited does not apply to engine infedit"),
    ("ddim-p2p", "a blue square", {"inject_features": 1.5}, "--inject-features 1.5"),
    ("infedit", "a blue square", {"inject_features": 0.5, "feature_layers": ["up_blocks.9"]},
     "feature layer 'up_blocks.9' is not a module of this network"),
])
def test_bad_edit_inputs(tiny, square, engine, target, params, message):
    _, model = tiny("sd1")
    record, _ = invert_image(model, square, plan_job(model, engine=engine, steps=4), prompt="a red square", check=False)
    with pytest.raises(UsageError, match=message):
        edit_record(model, record, target, plan_of_record(model, record.meta, edit=True, params=params))


def test_feature_injection_copies_the_source_rows_features_then_unhooks(tiny):
    from diffedit.editing.attention import AttentionControl, Chain, Controller
    from diffedit.editing.features import PNP_LAYERS, FeatureInjection

    pipe, _ = tiny("sd1")
    unet, layer = pipe.unet, PNP_LAYERS[0]
    block = unet.get_submodule(layer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen)  # chunks [uncond: source, target | cond: source, target]
    text = torch.randn(4, 77, unet.config.cross_attention_dim, generator=gen)
    reference = unet(x, 10, text).sample
    seen = []
    injection = FeatureInjection([layer], steps=10, fraction=0.3)
    control = AttentionControl(unet, Chain(Controller(), injection))
    for step in (0, 2, 3):
        control.controller.begin(step, ("uncond", "cond"))
        with control:
            recorder = block.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
            edited = unet(x, 10, text).sample
            recorder.remove()
        copied = torch.equal(seen[-1][1], seen[-1][0]) and torch.equal(seen[-1][3], seen[-1][2])
        assert copied == (step < 3), step  # round(0.3 * 10) = 3 steps injected
        assert torch.equal(edited[[0, 2]], reference[[0, 2]])  # the source rows are untouched
        assert torch.equal(edited[[1, 3]], reference[[1, 3]]) == (step >= 3)
    assert not block._forward_hooks
    assert torch.equal(unet(x, 10, text).sample, reference)


def test_feature_injection_keeps_the_identity_and_changes_edits(tiny, square):
    _, model = tiny("sd1")
    pnp = {"inject_features": 0.5}
    _, result = invert_image(model, square, plan_job(model, engine="infedit", steps=6, params=pnp), prompt="a red square")
    assert result["latent_max_abs"] <= 1e-4  # same prompt: the source's features are the target's own
    for engine in ("direct", "ddim-p2p", "infedit"):
        record, _ = invert_image(model, square, plan_job(model, engine=engine, steps=6), prompt="a red square", check=False)
        plain, _ = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True))
        injected, _ = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, params=pnp))
        assert not np.array_equal(np.asarray(plain), np.asarray(injected)), engine


def test_prompt_to_prompt_needs_a_unet(tiny, square):
    _, model = tiny("sd3")
    record, _ = invert_image(model, square, plan_job(model, engine="direct", steps=4), prompt="a red square", check=False)
    with pytest.raises(UsageError, match="needs cross-attention layers"):
        edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True))


def test_cli_show_attention_grid(cli, tmp_path, tiny_folder, square):
    grid = tmp_path / "maps.png"
    code, out, err = cli("edit", square, "-s", "a red square", "-t", "a blue square", "-e", "direct", "-n", 6,
                         "--blend", "square", "--reweight", "blue=2", "--show-attention", grid,
                         "-m", tiny_folder("sd1"), "-o", tmp_path / "e.png", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["engine"] == "direct"
    tokens = 5  # start, a, blue, square, end
    assert Image.open(grid).width == 96 * tokens
    code, _, err = cli("edit", square, "-s", "a", "-t", "b", "-e", "ddim", "--reweight", "b=x", "-o", tmp_path / "x.png")
    assert code == 2 and "WORD=FACTOR" in err
    code, _, err = cli("edit", square, "-s", "a red square", "-t", "a blue square", "-e", "infedit", "-n", 4,
                       "--inject-features", "0.5", "--feature-layers", "up_blocks.1.resnets.1,up_blocks.9",
                       "-m", tiny_folder("sd1"), "-o", tmp_path / "f.png")
    assert code == 2 and "feature layer 'up_blocks.9' is not a module" in err and not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("kind", ["cfgpp", "pag", "cfgpp+pag"])
def test_every_guidance_in_per_row_engines(tiny, square, kind):
    """InfEdit gives source and target rows their own scales; every guidance kind takes that."""
    from diffedit.guidance import GuidanceSpec

    _, model = tiny("sd1")
    record, result = invert_image(model, square, plan_job(model, engine="infedit", steps=6, guidance=GuidanceSpec(kind), inversion_guidance_scale=0.5), prompt="a red square")
    assert result["latent_max_abs"] <= 1e-4  # same prompt and scale: still the identity
    image, edited = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, guidance_scale=0.8))
    assert edited["nfe"] == 6 and np.asarray(image).std() > 0


def test_feature_injection_keeps_the_toy_lcms_scenes_when_recolouring():
    """InfEdit on the shipped toy LCM, first six ShapesBench recolour tasks: the source's decoder
    features for the first 40 % of the steps recolour more of them and keep more background on
    average (all 40, docs/benchmarks.md: 37.5 → 57.5 % success, 25.0 → 28.3 dB). On v1's LCM, whose
    layout lived in the convolutions, it kept every background better (20 → 35 %, 21.2 → 32.0 dB);
    the LCM of v3, whose layout follows the attention maps, is kept by InfEdit's attention control
    on some tasks already, where injection changes little either way."""
    from pathlib import Path

    from diffedit.jobs import edit_image
    from diffedit.models import load_model
    from lab.toy import bench

    model = load_model(Path(__file__).parents[1] / "samples" / "toy-lcm", device="cpu")
    tasks = [t for t in bench.load_tasks() if t["kind"] == "recolour"][:6]
    runs = {}
    for fraction in (0.0, 0.4):
        runs[fraction] = []
        for task in tasks:
            source = Image.fromarray(bench.source_scene(task).image)
            image, _, _ = edit_image(model, source, plan_job(model, engine="infedit", params={"inject_features": fraction}), source_prompt=task["source_prompt"], target_prompt=task["target_prompt"])
            runs[fraction].append(bench.judge(task, np.asarray(image)))
    plain, injected = runs[0.0], runs[0.4]
    assert np.mean([b["bg_psnr"] - a["bg_psnr"] for a, b in zip(plain, injected)]) >= 1.5  # 2.9 dB here
    assert sum(b["success"] for b in injected) > sum(a["success"] for a in plain)  # 4 against 2


def test_infedit_runs_only_the_uncond_rows_something_reads(tiny):
    """At source scale 1 (InfEdit's default) no guidance reads the source's and layout's uncond rows;
    the denoiser keeps the target's, and the source's while the target copies its queries and keys,
    and predicts the same as with every row, in smaller forwards."""
    from diffedit.editing.attention import Chain, Controller
    from diffedit.editing.uac import UnifiedAttentionControl

    _, model = tiny("sd1")
    tokenizer = model.pipe.tokenizer
    mapper, alpha, _ = align(tokenizer, "a red square", "a blue square", "refine", tokenizer.model_max_length)
    steps, schedule = 4, model.schedule(4, 32, 32)

    def denoiser(every_row: bool):
        control = UnifiedAttentionControl(steps, 0.5, 0.7, mapper[None], alpha[None], None)
        # a controller that reads chunks as full stacks makes the denoiser keep every row
        control = Chain(control, Controller()) if every_row else control
        return prompt_denoiser(model, ["a red square", "a blue square", "a red square"], CFG([1.0, 2.0, 1.0]),
                               32, 32, controller=control)

    trimmed, full = denoiser(False), denoiser(True)
    x = initial_noise(model.latent_shape(3, 32, 32), [0, 0, 0], model.device)
    for i in range(steps):
        for ours, theirs in zip(trimmed(x, schedule, i), full(x, schedule, i)):
            assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    # uncond rows: target and source for the 2 steps of self-attention replacement, then the target alone
    assert trimmed.forwards == {3 + 2: 2, 3 + 1: 2} and full.forwards == {6: 4}
