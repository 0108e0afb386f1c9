"""Training the toy model's layout phase (3b): colour-swap pairs and the source's attention maps."""

from __future__ import annotations

import numpy as np
import torch

from diffedit.editing.attention import AttentionControl
from lab.toy import model as toy
from lab.toy.train import PairedMaps, TrainConfig, colour_swap_scenes, tune_layout


def test_colour_swaps_change_one_objects_colour_and_nothing_else():
    pairs = colour_swap_scenes(TrainConfig(seed=3, layout_pairs=12))
    assert len(pairs) == 12
    for source, target in pairs:
        changed = [i for i, (a, b) in enumerate(zip(source.objects, target.objects)) if a != b]
        assert len(changed) == 1
        a, b = source.objects[changed[0]], target.objects[changed[0]]
        assert (a.shape, a.center, a.size) == (b.shape, b.center, b.size) and a.colour != b.colour
        differs = np.any(source.image != target.image, -1)
        assert differs.any() and not differs[~target.masks[changed[0]]].any()  # only inside that object
        words = [(x, y) for x, y in zip(source.caption.split(), target.caption.split()) if x != y]
        assert len(source.caption.split()) == len(target.caption.split())
        assert set(words) <= {(a.colour, b.colour), ("a", "an"), ("an", "a")} and (a.colour, b.colour) in words


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


def test_layout_phase_trains_and_resumes(tmp_path):
    torch.manual_seed(0)
    tokenizer = toy.make_tokenizer()
    unet, encoder = toy.make_unet(), toy.make_text_encoder(tokenizer, word_local=True)
    config = TrainConfig(layout_steps=2, unet_batch=2, layout_batch=1, checkpoint_every=1, warmup=1)
    latents, captions = torch.randn(4, 4, 16, 16), [s.caption for s, _ in colour_swap_scenes(TrainConfig(layout_pairs=4))]
    pairs = {"sources": torch.randn(3, 4, 16, 16), "targets": torch.randn(3, 4, 16, 16),
             "source_captions": ["a red circle"] * 3, "target_captions": ["a blue circle"] * 3}
    tuned, _ = tune_layout(config, unet, encoder, tokenizer, latents, captions, pairs, tmp_path, lambda *a: None)
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), unet.parameters()))
    again, _ = tune_layout(config, unet, encoder, tokenizer, latents, captions, pairs, tmp_path, lambda *a: None)
    assert all(torch.equal(p, q) for p, q in zip(tuned.parameters(), again.parameters()))  # resumed at its end
