"""Training the toy model: the layout phase (3b), its colour-swap pairs and attention maps, and `toy train`'s options."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffedit.editing.attention import AttentionControl
from diffedit.toy.shapes import make_scene, named_objects, user_caption
from lab.toy import model as toy
from lab.toy.train import (
    PairedMaps,
    TrainConfig,
    _grounding_loss,
    _vae_batch,
    fit_denoiser,
    object_token_masks,
    photo_sources,
    plain_colour,
    swap_scenes,
    tune_layout,
)


@pytest.mark.parametrize("attribute", ["colour", "shape"])
def test_swaps_change_one_objects_attribute_and_nothing_else(attribute):
    pairs = swap_scenes(TrainConfig(seed=3, layout_pairs=12), attribute)
    assert len(pairs) == 12
    kept = {"colour": ("shape", "center", "size"), "shape": ("colour", "center", "size")}[attribute]
    for source, target in pairs:
        changed = [i for i, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b]
        assert len(changed) == 1
        a, b = source.objects[changed[0]], target.objects[changed[0]]
        assert all(getattr(a, k) == getattr(b, k) for k in kept) and getattr(a, attribute) != getattr(b, attribute)
        differs = np.any(source.image != target.image, -1)
        inside = source.masks[changed[0]] | target.masks[changed[0]]
        assert differs.any() and not differs[~inside].any()  # only where that object was or now is
        words = [(x, y) for x, y in zip(source.caption.split(), target.caption.split()) if x != y]
        assert len(source.caption.split()) == len(target.caption.split())
        pair = (getattr(a, attribute), getattr(b, attribute))
        assert set(words) <= {pair, ("a", "an"), ("an", "a")} and pair in words


def test_vae_batches_draw_the_asked_share_of_plain_backgrounds():
    """The VAE phases put `plain_fraction` of the scenes on one plain colour (the last phase more than
    the first); with none, the world's own backgrounds stay."""
    config = TrainConfig(vae_batch=8, photo_fraction=0.0)
    photos = photo_sources()[:1]

    def plain_backgrounds(fraction):
        count = 0
        for step in range(4):
            images, weights = _vae_batch(config, photos, 1, step, fraction)
            for image, weight in zip(images, weights[:, 0]):
                background = image[:, weight == 1.0]  # objects weigh 10
                count += bool((background == background[:, :1]).all())
        return count

    assert plain_backgrounds(1.0) == 32
    assert plain_backgrounds(0.0) < 32  # two-tone backgrounds among the world's own


def test_whole_plain_images_only_when_asked():
    """`--whole-plain`: that share of the plain scenes is one colour throughout (no object weights);
    at 0 the batches are the shipped recipe's, draw for draw."""
    config = TrainConfig(vae_batch=8, photo_fraction=0.0)
    photos = photo_sources()[:1]
    default = _vae_batch(config, photos, 3, 0, 1.0, 0.5)
    torch.testing.assert_close(_vae_batch(config, photos, 3, 0, 1.0, 0.5, whole=0.0), default, rtol=0, atol=0)
    images, weights = _vae_batch(config, photos, 3, 0, 1.0, 0.5, whole=1.0)
    assert (weights == 1.0).all()
    assert all((image == image[:, :1, :1]).all() for image in images)


def test_saturated_plain_colours_reach_the_cube_surface():
    """A uniform draw almost never puts a channel at 0 or 255 except on pure white and black; the
    saturated share does, and reaches the cube's other corners (pure red, blue, yellow...)."""
    def draw(saturated):
        rng = np.random.default_rng(0)
        colours = np.array([plain_colour(rng, saturated) for _ in range(2000)]).astype(int)
        grey_ends = np.all(colours == 0, 1) | np.all(colours == 255, 1)
        ends = (colours == 0) | (colours == 255)
        return colours[~grey_ends], ends[~grey_ends]

    _, ends = draw(0.0)
    assert ends.any(1).mean() < 0.05
    colours, ends = draw(1.0)
    assert ends.any(1).all()  # every colour on the surface
    corners = {tuple(c) for c, e in zip(colours, ends) if e.all()}
    assert {(255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)} <= corners


def _attention_params(unet, kind):
    return [p for name, p in unet.named_parameters() if f".{kind}." in name and ".attn" in name]


def test_paired_maps_leave_the_target_only_its_values():
    """The target rows (second half) attend with the source rows' maps, detached: a loss on the target
    reaches no query or key weight (the maps are learned by plain denoising alone), but does reach the
    value weights; a loss on the source reaches the queries."""
    torch.manual_seed(0)
    unet = toy.make_unet()
    x, t = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1), torch.tensor([500, 500])
    emb = torch.randn(2, 8, toy.TEXT_DIM)
    for row, queries_learn in ((1, False), (0, True)):
        unet.zero_grad(set_to_none=True)
        with AttentionControl(unet, PairedMaps()):
            out = unet(x, t, encoder_hidden_states=emb).sample
        out[row].square().mean().backward()
        for kind in ("to_q", "to_k"):
            grads = [p.grad for p in _attention_params(unet, kind)]
            assert grads and all((g is not None and g.abs().sum() > 0) == queries_learn for g in grads), kind
        assert all(p.grad.abs().sum() > 0 for p in _attention_params(unet, "to_v"))
    with torch.no_grad(), AttentionControl(unet, PairedMaps()):  # the same maps: equal inputs, equal rows
        same = unet(x, t, encoder_hidden_states=emb[:1].repeat(2, 1, 1)).sample
    torch.testing.assert_close(same[0], same[1])


def test_paired_maps_release_only_the_marked_words_of_cross_attention():
    """Phase 8's reshape rows keep their own map for the new shape word (once its held steps are past)
    and take the source's for every other word and for self-attention."""
    from diffedit.editing.attention import AttnCall

    probs = torch.rand(4, 2, 6, 3)  # rows 0-1 the sources, 2-3 their targets; 3 text tokens
    released = torch.tensor([[False, True, False], [False, False, False]])
    call = dict(layer="x", image_tokens=6, joint=False, step=0, branches=("cond",))
    cross = PairedMaps(released).maps(AttnCall(cross=True, **call), probs)
    torch.testing.assert_close(cross[:2], probs[:2])
    torch.testing.assert_close(cross[2, ..., 1], probs[2, ..., 1])  # the released word: the target's own
    torch.testing.assert_close(cross[2, ..., [0, 2]], probs[0, ..., [0, 2]])
    torch.testing.assert_close(cross[3], probs[1])
    self_maps = PairedMaps(released).maps(AttnCall(cross=False, **call), probs)
    torch.testing.assert_close(self_maps[2:], probs[:2])


def test_object_token_masks_mark_each_objects_words_with_where_it_is():
    from diffedit.toy.shapes import Obj, render

    tokenizer = toy.make_tokenizer()
    scene = render([Obj("circle", "red", (16.0, 16.0), 8.0), Obj("square", "blue", (46.0, 46.0), 10.0)], ("white",))
    texts = ["a blue square and a red circle on a white background", "blue square"]
    masks = object_token_masks(tokenizer, texts, [scene, scene])
    words = tokenizer(texts[0]).input_ids
    circle, square = (torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(m).float()[None], 16)[0] for m in scene.masks)
    for word, where in (("blue", square), ("square", square), ("red", circle), ("circle", circle)):
        torch.testing.assert_close(masks[0, words.index(tokenizer.get_vocab()[f"{word}</w>"])], where)
    assert masks[0].flatten(1).amax(1).gt(0).sum() == 4  # no other word marked, the background's neither
    assert masks[1].flatten(1).amax(1).gt(0).sum() == 2  # the circle is not named: its place marks nothing
    assert not object_token_masks(tokenizer, texts[:1], [None]).any()


def test_grounding_loss_is_zero_on_the_object_and_grows_with_what_leaks_out():
    token_masks = torch.zeros(1, 3, 16, 16)
    token_masks[0, 1, :8, :8] = 1  # word 1 names an object in the top-left quarter; words 0 and 2 none
    inside = token_masks[0, 1].flatten() / token_masks[0, 1].sum()
    for side in (16, 8, 4):  # every cross-attention level of the UNet sees the mask at its own size
        pooled = torch.nn.functional.adaptive_avg_pool2d(token_masks[0, 1][None], side).flatten()
        probs = torch.stack([torch.full((side * side,), 0.5), pooled / pooled.sum() * 0.5, torch.zeros(side * side)], -1)
        assert _grounding_loss(probs[None, None], token_masks).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 2, 256, 3), 1 / 3)
    assert _grounding_loss(uniform, token_masks).item() == pytest.approx(0.75**2)  # a quarter of its mass inside
    half = uniform.clone()
    half[..., 1] = 0.5 * inside + 0.5 / 256  # half its mass on the object, half spread evenly (a quarter of it inside)
    assert _grounding_loss(half, token_masks).item() == pytest.approx((1 - 0.5 - 0.5 * 0.25) ** 2)


def test_layout_phase_trains_and_resumes(tmp_path):
    torch.manual_seed(0)
    tokenizer = toy.make_tokenizer()
    unet, encoder = toy.make_unet(), toy.make_text_encoder(tokenizer, "word")
    config = TrainConfig(layout_steps=2, unet_batch=2, layout_batch=1, layout_pairs=3, checkpoint_every=1, warmup=1,
                         grounding=0.0)  # phase 3b's: never grounded
    latents, captions = torch.randn(4, 4, 16, 16), [s.caption for s, _ in swap_scenes(TrainConfig(layout_pairs=4), "colour")]
    pairs = {"sources": torch.randn(3, 4, 16, 16), "targets": torch.randn(3, 4, 16, 16),
             "source_captions": ["a red circle"] * 3, "target_captions": ["a blue circle"] * 3}
    tuned, _ = tune_layout(config, unet, encoder, tokenizer, latents, captions, pairs, tmp_path, lambda *a: None)
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), unet.parameters()))
    again, _ = tune_layout(config, unet, encoder, tokenizer, latents, captions, pairs, tmp_path, lambda *a: None)
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), again.parameters()))  # resumed at its end
    with pytest.raises(RuntimeError, match="pairs.pt"):  # grounding needs the swaps' scenes: these are not config's
        tune_layout(replace(config, grounding=1.0), unet, encoder, tokenizer, latents, captions, pairs, tmp_path / "g",
                    lambda *a: None)


def test_grounding_trains_only_on_the_levels_it_is_given(tmp_path):
    """The grounding changes what the layout phase learns; kept off every noise level (`grounding_below`
    0) it changes nothing, so the gate really gates."""
    tokenizer = toy.make_tokenizer()
    config = TrainConfig(layout_steps=1, unet_batch=1, layout_batch=2, layout_pairs=3, checkpoint_every=1, warmup=1)
    swapped = swap_scenes(config, "colour")
    pairs = {"sources": torch.randn(3, 4, 16, 16), "targets": torch.randn(3, 4, 16, 16),
             "source_captions": [a.caption for a, _ in swapped], "target_captions": [b.caption for _, b in swapped]}
    latents, captions = torch.randn(4, 4, 16, 16), pairs["source_captions"] + ["a red circle"]

    def tuned(name, grounding, below=1000):
        torch.manual_seed(0)
        unet, encoder = toy.make_unet(), toy.make_text_encoder(tokenizer, "previous")
        (tmp_path / name).mkdir()
        return tune_layout(replace(config, grounding=grounding, grounding_below=below), unet, encoder, tokenizer,
                           latents, captions, pairs, tmp_path / name, lambda *a: None)[0].state_dict()

    plain, grounded, gated = tuned("plain", 0.0), tuned("grounded", 1.0), tuned("gated", 1.0, below=0)
    assert any(not torch.equal(plain[k], grounded[k]) for k in plain)
    assert all(torch.equal(plain[k], gated[k]) for k in plain)


def test_train_cli_refuses_a_vae_width_its_group_norms_cannot_split_and_chances_that_are_none(tmp_path, cli):
    code, _, err = cli("toy", "train", "--vae-width", 40, "--out", tmp_path / "model", "--work", tmp_path / "work")
    assert code == 2 and "40 is not a multiple of 16" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()
    code, _, err = cli("toy", "train", "--object-counts", 0.5, 0.5, 0.5, "--out", tmp_path / "model", "--work", tmp_path / "work")
    assert code == 2 and "summing to 1" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("command", ["train", "tune-layout"])
def test_toy_training_commands_default_to_the_training_config_s_recipe(command):
    """The CLI states its defaults for --help; they must be TrainConfig's, the recipe the shipped model names."""
    from diffedit.cli.main import commands

    options = commands()["toy"].commands[command].params
    config = TrainConfig()
    # tune-layout's seed is phase 7's, TrainConfig's the whole run's (phase 7 takes seed + 1 by default)
    shared = {p.name: p.default for p in options if hasattr(config, p.name) and (command, p.name) != ("tune-layout", "seed")}
    assert {"grounding", "grounding_below"} <= shared.keys()
    for name, default in shared.items():
        expected = getattr(config, name)
        assert (tuple(default) if isinstance(expected, tuple) else default) == expected, name


@pytest.mark.parametrize("context, grounding, relayout_seed", [("word", 0.0, None), ("previous", 0.1, 5)])
def test_train_runs_every_phase_saves_a_pipeline_and_resumes_to_the_same_weights(tmp_path, context, grounding, relayout_seed):
    from diffusers import StableDiffusionPipeline

    from lab.toy import model as toy_model
    from lab.toy.train import train

    config = TrainConfig(text_context=context, vae_width=16, vae_steps=2, vae_batch=2, decoder_steps=1, decoder_mse_steps=1,
                         plain_decoder_steps=1, dataset=6, unet_steps=2, unet_batch=2, warmup=1, layout_steps=2,
                         layout_pairs=3, layout_batch=1, relayout_steps=1, reshape_layout_steps=1, reshape_batch=1,
                         checkpoint_every=1, grounding=grounding, object_counts=(0.2, 0.5, 0.3) if grounding else (0.5, 0.3, 0.2),
                         relayout_seed=relayout_seed)
    phase7_seed = 1 if relayout_seed is None else relayout_seed  # by default the seed after the first phases' (0)
    summary = train(tmp_path / "a", tmp_path / "work", config, lambda *_: None)
    assert len(list((tmp_path / "work").glob("decoder_mse-*.ckpt"))) == 2  # phases 5 and 6, each its own run
    # The UNet's scenes with the asked chances of each object count, recorded with them (phases 3 and 7)
    dataset = torch.load(tmp_path / "work" / "latents.pt")
    assert dataset["object_counts"] == list(config.object_counts)
    assert dataset["captions"] == [make_scene(i, object_counts=config.object_counts).caption for i in range(6)]
    assert len(list((tmp_path / "work" / "phase7").glob("layout-*.ckpt"))) == 1  # phase 7, on the next seed's scenes
    assert torch.load(tmp_path / "work" / "phase7" / "latents.pt")["seed"] == phase7_seed
    assert not (tmp_path / "work" / "phase7" / "pairs-shape.pt").exists()  # phase 7: colour swaps only
    assert len(list((tmp_path / "work" / "phase8").glob("layout-*.ckpt"))) == 1  # phase 8, shape swaps too
    assert torch.load(tmp_path / "work" / "phase8" / "pairs-shape.pt")["seed"] == phase7_seed + 1
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert toy_model.text_context(pipe.text_encoder) == context  # kept through phases 7 and 8 on the saved model
    assert pipe.vae.config.block_out_channels == [16, 32, 32]
    assert pipe.vae.config.scaling_factor == summary["scaling_factor"] > 0
    assert len(torch.load(tmp_path / "work" / "latents.pt")["captions"]) == 6
    pairs = torch.load(tmp_path / "work" / "pairs.pt")
    assert pairs["sources"].shape == pairs["targets"].shape == (3, 4, 16, 16) and len(pairs["target_captions"]) == 3
    train(tmp_path / "b", tmp_path / "work", config, lambda *_: None)  # every phase resumes at its end
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    for part in ("unet", "text_encoder", "vae"):
        old, new = getattr(pipe, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), part


def test_train_cli_refuses_a_start_that_is_no_flow_model(tmp_path, cli):
    args = ("--out", tmp_path / "model", "--work", tmp_path / "work")
    code, _, err = cli("toy", "train", "--init-from", "samples/toy-flow", *args)
    assert code != 0 and "needs --flow" in err
    code, _, err = cli("toy", "train", "--flow", "--init-from", tmp_path / "nowhere", *args)
    assert code != 0 and "nowhere: no toy flow model" in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()


def test_denoiser_training_reads_the_captions_as_people_type_them(tmp_path):
    """With `rewrite` (the toy SD model's UNet phase; the flow model's `--user-captions`) the drawn
    captions are trained in other forms of themselves, short ones included; without it, as written.
    Dropped captions stay empty either way."""
    captions = [make_scene(i).caption for i in range(32)]

    def texts_trained(rewrite, name):
        seen = []

        def loss_of(net, gen, z0, texts):
            seen.extend(texts)
            return net(z0).pow(2).mean()

        fit_denoiser(TrainConfig(warmup=1), lambda: torch.nn.Linear(4, 4), lambda net: None, loss_of,
                     torch.ones(32, 4), captions, 6, 16, 1e-3, tmp_path / f"{name}.ckpt", name, lambda *a: None,
                     rewrite=rewrite)
        return seen

    assert set(texts_trained(None, "template")) <= set(captions) | {""}
    seen = texts_trained(user_caption, "user")
    forms = [text for text in seen if text]
    assert "" in seen and len(forms) >= 80
    assert sum(text not in captions for text in forms) >= len(forms) // 2
    assert any(" on a " not in text for text in forms) and any(" on a " in text for text in forms)
    scenes = [named_objects(c) for c in captions]
    assert all(named_objects(text) in scenes for text in forms)
