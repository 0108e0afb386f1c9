"""LoRA files: fused weights equal diffusers' own LoRA loader (PEFT and kohya layouts), LCM-LoRA
turns a base model into a latent-consistency model, records remember their LoRAs, bad files are
refused clearly; the LCM-LoRA distillation saves a file diffusers loads; the shipped toy LCM-LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffedit import lora
from diffedit.errors import DiffeditError, UsageError
from diffedit.models import load_model
from lab.testing import save_tiny_pipeline, tiny_pipeline

# A spread of layer kinds: attention projections, feed-forward, 1x1 and 3x3 convolutions, text encoder.
UNET_LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
               "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
               "down_blocks.1.attentions.0.proj_in", "mid_block.resnets.0.conv1"]
# LoRA files name CLIP's layers with the `text_model.` level transformers 5 no longer has
TEXT_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def random_lora(pipe, layout: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, root, names in (("unet", pipe.unet, UNET_LAYERS), ("text_encoder", pipe.text_encoder, TEXT_LAYERS)):
        for name in names:
            w = root.get_submodule(name).weight
            name = name if component == "unet" else f"text_model.{name}"
            down_shape = (rank, *w.shape[1:]) if w.dim() == 4 else (rank, w.shape[1])
            up_shape = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
            down, up = 0.3 * torch.randn(down_shape, generator=gen), 0.3 * torch.randn(up_shape, generator=gen)
            if layout == "peft":
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
            else:
                stem = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
                tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors


def outputs(pipe):
    """The UNet's and the text encoder's outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(5)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 8, pipe.unet.config.cross_attention_dim,
                                                                     generator=gen)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(x, 500, encoder_hidden_states=context).sample


def test_fused_lora_equals_diffusers_loader(tmp_path):
    file = tmp_path / "style.safetensors"
    save_file(random_lora(tiny_pipeline("sd1"), "peft"), str(file))
    reference = tiny_pipeline("sd1")
    reference.load_lora_weights(str(tmp_path), weight_name=file.name)
    reference.fuse_lora(lora_scale=0.7)
    ours = tiny_pipeline("sd1")
    assert lora.fuse(ours, file, 0.7) == len(UNET_LAYERS) + len(TEXT_LAYERS)
    plain = outputs(tiny_pipeline("sd1"))
    for want, got, before in zip(outputs(reference), outputs(ours), plain):
        assert (got - before).abs().max() > 1e-3  # the LoRA changes the model
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_kohya_layout_reads_as_diffusers_does(tmp_path):
    """alpha / rank scales the update, as in diffusers' loader; every layer equals the same LoRA in
    the PEFT layout (compared directly: diffusers' kohya converter drops CLIP's q_proj under
    transformers 5, so its text encoder is no reference here)."""
    kohya, peft = tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors"
    save_file(random_lora(tiny_pipeline("sd1"), "kohya", rank=4, alpha=2.0), str(kohya))
    save_file(random_lora(tiny_pipeline("sd1"), "peft"), str(peft))
    reference = tiny_pipeline("sd1")
    reference.load_lora_weights(str(tmp_path), weight_name=kohya.name)
    reference.fuse_lora(lora_scale=0.7)
    ours = tiny_pipeline("sd1")
    lora.fuse(ours, kohya, 0.7)
    want, got = outputs(reference)[1], outputs(ours)[1]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    same = tiny_pipeline("sd1")
    lora.fuse(same, peft, 0.7 * 2.0 / 4)
    for (name, p), q in zip([*ours.unet.named_parameters(), *ours.text_encoder.named_parameters()],
                            [*same.unet.parameters(), *same.text_encoder.parameters()]):
        assert torch.allclose(p, q, atol=1e-6), name


# UNET_LAYERS by the original Stable Diffusion code's names, for the tiny UNet (one ResNet per level):
# input_blocks 0 = conv_in, 1-2 = level 0 (ResNet, downsampler), 3 = level 1 (ResNet + attention).
LDM_NAMES = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
             "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v":
             "input_blocks.3.1.transformer_blocks.0.attn2.to_v",
             "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2":
             "output_blocks.1.1.transformer_blocks.0.ff.net.2",
             "down_blocks.1.attentions.0.proj_in": "input_blocks.3.1.proj_in",
             "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2"}


def test_ldm_named_kohya_lora_equals_diffusers_named(tmp_path):
    """A kohya file naming the original layout's UNet layers fuses as the same LoRA under diffusers'
    names (diffusers' own loader refuses it on this tiny UNet, so the reference is ours, which equals
    diffusers' loader above; the layout's names are `models export`'s, which diffusers' single-file
    loader reads back exactly); on SDXL too, whose add_embedding has no such name."""
    kohya = random_lora(tiny_pipeline("sd1"), "kohya")
    renames = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + ldm.replace(".", "_")
               for d, ldm in LDM_NAMES.items()}
    ldm = {renames.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in kohya.items()}
    assert len(set(ldm) - set(kohya)) == 3 * len(LDM_NAMES)
    for name, tensors in (("kohya", kohya), ("ldm", ldm)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    ours, same = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    assert lora.fuse(ours, tmp_path / "ldm.safetensors", 0.7) == len(UNET_LAYERS) + len(TEXT_LAYERS)
    lora.fuse(same, tmp_path / "kohya.safetensors", 0.7)
    for (name, p), q in zip(ours.unet.named_parameters(), same.unet.parameters()):
        assert torch.equal(p, q), name

    sdxl = tiny_pipeline("sdxl")
    layer = sdxl.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k")
    before = layer.weight.clone()
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_k"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, before.shape[1]),
               f"{stem}.lora_up.weight": torch.ones(before.shape[0], 2)}, str(tmp_path / "xl.safetensors"))
    assert lora.fuse(sdxl, tmp_path / "xl.safetensors") == 1
    torch.testing.assert_close(layer.weight, before + 2.0)


def test_parse_spec():
    assert lora.parse_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora.parse_spec("dir/style.safetensors:0.6") == ("dir/style.safetensors", 0.6)
    assert lora.parse_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    with pytest.raises(UsageError, match="finite"):
        lora.parse_spec("style.safetensors:nan")


def test_bad_lora_files_are_refused_by_name(tmp_path, tiny_folder):
    pipe = tiny_pipeline("sd1")
    good = random_lora(pipe, "kohya")
    cases = {
        # input_blocks.1 is a ResNet block alone (the first level has no attention)
        "ldm": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
                 "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, "not in this model"),
        "unknown": ({"model.weight": torch.zeros(2)}, "unrecognised LoRA key 'model.weight'"),
        "elsewhere": ({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 32),
                       "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 4)}, "not in this model"),
        "shape": ({"unet.mid_block.resnets.0.conv1.lora_A.weight": torch.zeros(4, 7, 3, 3),
                   "unet.mid_block.resnets.0.conv1.lora_B.weight": torch.zeros(64, 4, 1, 1)}, "another base model"),
        "half": ({k: v for k, v in good.items() if "lora_up" not in k}, "lacks its up matrix"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(DiffeditError, match=message) as err:
            lora.fuse(pipe, path)
        assert str(path) in str(err.value)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01not safetensors")
    (tmp_path / "pickled.bin").write_bytes(b"")
    for path, message in ((tmp_path / "corrupt.safetensors", "not a readable safetensors file"),
                          (tmp_path / "pickled.bin", "must be .safetensors"),
                          (tmp_path / "missing.safetensors", "no such LoRA file")):
        with pytest.raises(DiffeditError, match=message):
            lora.fuse(pipe, path)
    lcm_file = tmp_path / "lcm.safetensors"
    save_file(random_lora(pipe, "peft"), str(lcm_file))
    with pytest.raises(UsageError, match="not sd3"):
        load_model(tiny_folder("sd3"), device="cpu", lcm_lora=str(lcm_file))


def test_lcm_lora_cli_records_and_errors(cli, tiny_folder, tmp_path):
    from PIL import Image

    from diffedit.records import load_record

    folder = tiny_folder("sd1")
    file = tmp_path / "lcm.safetensors"
    save_file(random_lora(tiny_pipeline("sd1"), "peft"), str(file))
    code, out, err = cli("models", "info", folder, "--lcm-lora", file, "--json")
    assert code == 0, err
    assert '"scheduler": "LCMScheduler"' in out and f'"loras": [{{"path": "{file}", "scale": 1.0, "lcm": true}}]' in out
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    rec = tmp_path / "red.inv.safetensors"
    code, _, err = cli("invert", tmp_path / "red.png", "-m", folder, "--lora", f"{file}:0.5", "-p", "a red square",
                       "-n", "4", "-o", rec)
    assert code == 0, err
    made_with = load_record(rec).meta["model"]
    assert made_with["loras"] == [{"path": str(file), "scale": 0.5}]
    plain = load_model(folder, device="cpu").fingerprint
    assert made_with["fingerprint"] != plain
    # reconstruct re-applies the record's LoRA by itself; another scale is another model
    code, _, err = cli("reconstruct", rec, "-o", tmp_path / "back.png")
    assert code == 0, err
    code, _, err = cli("reconstruct", rec, "--lora", f"{file}:0.8", "-o", tmp_path / "back2.png", "--overwrite")
    assert code != 0 and "record was made with model" in err and "--lora" in err
    code, _, err = cli("generate", "a red circle", "-m", folder, "--lora", tmp_path / "none.safetensors",
                       "-o", tmp_path / "x.png")
    assert code != 0 and "none.safetensors: no such LoRA file" in err and not (tmp_path / "x.png").exists()


def test_lcm_lora_distillation_saves_a_file_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lab.toy.lcm import LORA_FILE, DistillConfig, distill

    teacher = save_tiny_pipeline("sd1", tmp_path / "teacher")
    config = DistillConfig(steps=3, batch=2, dataset=16, lora_rank=4, lr=1e-2, w_min=5.0, w_max=5.0)
    summary = distill(teacher, tmp_path / "out", tmp_path / "work", config, lambda *t: None)
    file = tmp_path / "out" / LORA_FILE
    assert summary["lora_layers"] > 10 and file.exists()
    model = load_model(teacher, device="cpu", lcm_lora=str(file))
    assert model.consistency and not model.guidance_embedded
    reference = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    reference.load_lora_weights(str(file.parent))
    reference.fuse_lora()
    want = outputs(reference)[1]
    got = outputs(model.pipe)[1]
    before = outputs(StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None,
                                                             requires_safety_checker=False))[1]
    assert (got - before).abs().max() > 0  # distillation moved the LoRA off zero
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()  # fp16 file, fused in fp32 either way


def test_shipped_toy_lcm_lora_draws_in_four_steps():
    """The toy LCM-LoRA fused into the toy model: 4 consistency steps without CFG draw what is asked (by
    the checker) on fixed seeds, as a rate (it draws 94 % of `bench lcm`'s 100 prompts, as its teacher
    does at 8 DDIM steps with CFG: samples/toy-lcm-lora/README.md); it is a small file that diffusers'
    own loader takes."""
    from diffusers import StableDiffusionPipeline

    from diffedit.models import DEFAULT_MODEL, TOY_LCM_LORA
    from lab.toy.quality import generate_batch, judge

    assert TOY_LCM_LORA.stat().st_size <= 5 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(TOY_LCM_LORA.parent))  # the reference loader takes it as it is
    model = load_model(DEFAULT_MODEL, device="cpu", lcm_lora=str(TOY_LCM_LORA))
    assert model.consistency and not model.guidance_embedded
    prompts = [("a red circle on a white background", "circle", "red"),
               ("a blue square on a white background", "square", "blue"),
               ("a green triangle on a grey background", "triangle", "green"),
               ("a yellow star on a black background", "star", "yellow")]
    batch = [(p, s, c, seed) for p, s, c in prompts for seed in range(1, 6)]
    images = generate_batch(model, [b[0] for b in batch], [b[3] for b in batch], steps=4, guidance_scale=1.0)
    right = [all(judge(i, s, c)) for i, (_, s, c, _) in zip(images, batch)]
    assert sum(right) >= 17, right  # 85 % of 20


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd3", "flux"])
def test_fused_lora_equals_diffusers_loader_on_every_family(family, tmp_path):
    """The network's first linear layers (and CLIP's, where the pipeline has CLIP encoders), in the
    PEFT layout, as diffusers' own loader of that pipeline fuses them."""
    pipe = tiny_pipeline(family)
    net_name = "unet" if hasattr(pipe, "unet") else "transformer"
    net = getattr(pipe, net_name)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    roots = [(net_name, net)] + [(c, getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")
                                  if type(getattr(pipe, c, None)).__name__.startswith("CLIPText")]
    for component, root in roots:
        linears = [n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear)][:6]
        for name in linears:
            w = root.get_submodule(name).weight
            # files name CLIP layers under `text_model.`, which transformers 5 kept on CLIPTextModelWithProjection only
            stored = name if component == net_name or name.startswith("text_model.") else f"text_model.{name}"
            tensors[f"{component}.{stored}.lora_A.weight"] = 0.3 * torch.randn(4, w.shape[1], generator=gen)
            tensors[f"{component}.{stored}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], 4, generator=gen)
    save_file(tensors, str(tmp_path / "l.safetensors"))
    reference = tiny_pipeline(family)
    reference.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
    reference.fuse_lora(components=[c for c, _ in roots], lora_scale=0.5)  # Flux fuses its transformer only by default
    ours = tiny_pipeline(family)
    assert lora.fuse(ours, tmp_path / "l.safetensors", 0.5) == len(tensors) // 2
    base = tiny_pipeline(family)
    for component, _ in roots:
        got, before = (dict(getattr(p, component).named_parameters()) for p in (ours, base))
        # the reference keeps PEFT's wrappers after fusing: `x.base_layer.weight` is the fused `x.weight`
        want = {n.replace(".base_layer", ""): p for n, p in getattr(reference, component).named_parameters()
                if ".lora_" not in n}
        assert want.keys() == got.keys()
        for name, p in got.items():
            assert torch.allclose(p, want[name], atol=1e-6), (component, name)
        assert any(not torch.equal(p, before[n]) for n, p in got.items())
