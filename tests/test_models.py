"""Model loading: family detection from configs, hub ids through the local cache, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_subprocess

from diffedit.errors import DiffeditError, UsageError
from diffedit.models import family_of_folder, load_model, pick_device, pick_dtype
from diffedit.records import FORMAT, Record, load_record, save_record


def test_family_detected_from_configs(tiny_folder, family, tmp_path):
    folder = tiny_folder(family)
    assert family_of_folder(folder) == family
    # the name tells nothing: a copy under a misleading name is still detected by its configs
    decoy = tmp_path / ("sdxl-" + family if family != "sdxl" else "sd1-model")
    shutil.copytree(folder, decoy)
    assert family_of_folder(decoy) == family


def test_load_folder_and_describe(cli, tiny_folder, family):
    code, out, err = cli("models", "info", tiny_folder(family), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["family"] == family
    assert info["prediction"] == {"sd2": "v_prediction", "sd3": "flow", "flux": "flow"}.get(family, "epsilon")
    assert info["network_parameters"] > 0 and len(info["fingerprint"]) == 16


def test_fingerprint_tells_models_apart(tiny_folder):
    a = load_model(tiny_folder("sd1"), device="cpu")
    b = load_model(tiny_folder("sd1"), device="cpu")
    c = load_model(tiny_folder("sd1", seed=1), device="cpu")
    assert a.fingerprint == b.fingerprint != c.fingerprint


def fake_hub_cache(root, repo_id, folder):
    """The layout huggingface_hub uses for a downloaded repo: blobs behind refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_local_cache_offline(tmp_path, tiny_folder):
    fake_hub_cache(tmp_path / "hub", "test-org/tiny-sd2", tiny_folder("sd2"))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = run_subprocess(["models", "info", "test-org/tiny-sd2", "--json"], env=env)
    assert done.returncode == 0, done.stderr.decode()
    info = json.loads(done.stdout)
    assert info["family"] == "sd2" and info["source"] == "test-org/tiny-sd2"


def test_hub_id_offline_and_missing_is_one_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    done = run_subprocess(["models", "info", "nobody/no-such-model"], env=env)
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.count("\n") == 1 and "nobody/no-such-model" in err and "HF_HUB_OFFLINE" in err


def test_pickled_folder_refused(tmp_path, tiny_folder):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder("sd1"), folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(DiffeditError, match="diffusion_pytorch_model.bin.*--allow-pickle"):
        load_model(folder, device="cpu")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffeditError, match="no model_index.json"):
        load_model(tmp_path / "empty", device="cpu")


def test_device_and_dtype_choices():
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(UsageError):
        pick_device("tpu")

    assert pick_dtype("auto", torch.device("cpu"), "sd1") == torch.float32
    assert pick_dtype("bf16", torch.device("cpu"), "flux") == torch.bfloat16
    with pytest.raises(UsageError):
        pick_dtype("fp8", torch.device("cpu"), "sd1")


def test_record_round_trip_and_newer_format(tmp_path):

    path = tmp_path / "r.safetensors"
    meta = {"model": {"source": "m", "fingerprint": "f"}, "engine": {"name": "ddim"}, "source_prompt": "",
            "steps": 3, "seed": 0, "guidance_scale": 1.0, "size": {"width": 16, "height": 16},
            "canvas": {"width": 16, "height": 16}}
    save_record(path, Record({"noise": torch.ones(1, 4, 2, 2), "latent": torch.zeros(1, 4, 2, 2)}, meta))
    rec = load_record(path)
    assert rec.meta["steps"] == 3 and rec.meta["format"] == FORMAT
    assert torch.equal(rec.tensors["noise"], torch.ones(1, 4, 2, 2))

    from safetensors.torch import save_file

    newer = tmp_path / "newer.safetensors"
    save_file({"noise": torch.ones(1)}, str(newer), metadata={"diffedit": json.dumps({"format": FORMAT + 1})})
    with pytest.raises(DiffeditError, match="newer.safetensors.*newer than"):
        load_record(newer)


def test_offloaded_model_places_hooks_and_gives_the_same_edit(tiny_folder):
    """--offload model keeps weights in CPU memory behind accelerate's hooks; on this CPU-only machine
    the hooks move nothing, but they are placed and every output is the one without them."""
    from PIL import Image

    from diffedit.jobs import edit_image
    from diffedit.plan import plan_job

    folder = tiny_folder("sd1")
    plain = load_model(folder, device="cpu")
    hooked = load_model(folder, device="cpu", offload="model")
    assert all(hasattr(getattr(hooked.pipe, name), "_hf_hook") for name in ("unet", "vae", "text_encoder"))
    assert not hasattr(plain.pipe.unet, "_hf_hook")
    assert hooked.device.type == "cpu"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    outs = [np.asarray(edit_image(m, img, plan_job(m, engine="direct", steps=3), source_prompt="a red cat",
                                  target_prompt="a blue cat")[0]) for m in (plain, hooked)]
    assert np.array_equal(*outs)
    with pytest.raises(UsageError, match="--offload"):
        load_model(folder, device="cpu", offload="layers")


def test_sequential_offload_leaves_no_weight_resident(tiny_folder):
    """--offload sequential streams each layer's weights to the device while it runs: none stays on
    the model (they wait on the meta device). Running it needs an accelerator: accelerate's hooks
    cannot offload to the CPU they run on."""
    hooked = load_model(tiny_folder("sd1"), device="cpu", offload="sequential")
    assert {p.device.type for p in hooked.pipe.unet.parameters()} == {"meta"}
    assert hasattr(hooked.pipe.unet.conv_in, "_hf_hook") and hooked.device.type == "cpu"
