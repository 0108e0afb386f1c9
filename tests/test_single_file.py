"""Single-file checkpoints: exported in the original layout, loaded back through diffusers offline."""

from __future__ import annotations

import json

import pytest
import torch

from diffedit.errors import DiffeditError
from diffedit.models import family_of_single_file, load_model
from lab.testing import tiny_pipeline


def test_export_and_load_back_exactly(cli, tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_folder("sd1")
    ckpt = tmp_path / "model.safetensors"
    code, out, err = cli("models", "export", folder, "-o", ckpt, "--json")
    assert code == 0, err
    assert json.loads(out)["family"] == "sd1"
    assert family_of_single_file(ckpt) == "sd1"
    loaded = load_model(ckpt, device="cpu", config=str(folder))
    original = tiny_pipeline("sd1")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    code, out, err = cli("models", "info", ckpt, "--model-config", folder, "--json")
    assert code == 0 and json.loads(out)["family"] == "sd1"


def test_single_file_without_configs_offline_is_one_clear_line(cli, tmp_path, tiny_folder, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    assert cli("models", "export", tiny_folder("sd1"), "-o", ckpt)[0] == 0
    from conftest import run_subprocess

    done = run_subprocess(["models", "info", ckpt], env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    err = done.stderr.decode()
    assert done.returncode == 1 and err.count("\n") == 1 and "model.safetensors" in err and "--model-config" in err


def test_corrupt_and_unknown_single_files(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DiffeditError, match="broken.safetensors: not a readable safetensors file"):
        load_model(bad, device="cpu")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(other))
    with pytest.raises(DiffeditError, match="unknown weight names"):
        load_model(other, device="cpu")


def test_export_refuses_other_families(cli, tmp_path, tiny_folder):
    code, _, err = cli("models", "export", tiny_folder("sd3"), "-o", tmp_path / "x.safetensors")
    assert code == 1 and "sd1" in err and not (tmp_path / "x.safetensors").exists()
