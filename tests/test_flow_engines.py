"""Flow-model engines: RF-Inversion and FlowEdit on tiny SD3 and Flux."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffedit.errors import UsageError
from diffedit.images import to_pil
from diffedit.jobs import edit_record, invert_image
from diffedit.plan import plan_job, plan_of_record


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_rf_inversion_at_strength_zero_is_euler(tiny, square, fam):
    _, model = tiny(fam)
    rf, rf_result = invert_image(model, square, plan_job(model, engine="rf-inversion", steps=8, params={"gamma": 0.0, "eta": 0.0}))
    euler, euler_result = invert_image(model, square, plan_job(model, engine="ddim", steps=8, inversion_guidance_scale=0.0))
    assert torch.equal(rf.tensors["noise"], euler.tensors["noise"])
    assert rf_result["latent_max_abs"] == euler_result["latent_max_abs"]


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_rf_inversion_controllers_act(tiny, square, fam):
    _, model = tiny(fam)
    plain, _ = invert_image(model, square, plan_job(model, engine="rf-inversion", steps=8, params={"gamma": 0.0}), check=False)
    steered, _ = invert_image(model, square, plan_job(model, engine="rf-inversion", steps=8, params={"gamma": 1.0}), check=False)
    y1 = torch.randn(plain.tensors["noise"].shape, generator=torch.Generator().manual_seed(0))
    # gamma = 1 follows the straight line to the fixed noise: it lands on it
    assert (steered.tensors["noise"] - y1).abs().max() <= 1e-4
    assert (plain.tensors["noise"] - y1).abs().max() > 0.1
    # eta = 1 over all steps pulls the edit onto the source latent
    image, _ = edit_record(model, steered, "a blue square", plan_of_record(model, steered.meta, edit=True, params={"eta": 1.0, "start": 0.0, "stop": 1.0}))
    source = to_pil(model.decode(steered.tensors["latent"]))
    assert np.abs(np.asarray(image).astype(int) - np.asarray(source).astype(int)).max() <= 1


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_flowedit_same_prompt_returns_the_source(tiny, square, fam):
    _, model = tiny(fam)
    record, result = invert_image(model, square, plan_job(model, engine="flowedit", steps=10, params={"n_max": 8}), prompt="a red square")
    assert result["latent_max_abs"] <= 1e-5
    assert result["psnr"] == pytest.approx(result["vae_psnr"], abs=0.01)
    assert result["nfe"] == 8  # no inversion: only the n_max editing steps
    _, edited = edit_record(model, record, "a blue square", plan_of_record(model, record.meta, edit=True, params={"n_min": 2, "n_avg": 2}))
    assert edited["nfe"] == 6 * 2 + 2


def test_flowedit_defaults_follow_the_family(tiny, square):
    _, sd3 = tiny("sd3")
    record, result = invert_image(sd3, square, plan_job(sd3, engine="flowedit"), check=False)
    assert record.meta["steps"] == 50 and record.meta["engine"]["n_max"] == 33
    assert record.meta["guidance_scale"] == 3.5
    _, flux = tiny("flux")
    record, _ = invert_image(flux, square, plan_job(flux, engine="flowedit"), check=False)
    assert record.meta["steps"] == 28 and record.meta["engine"]["n_max"] == 24
    # other step counts keep the paper's fraction of them (33/50 on SD3, 24/28 on Flux)
    record, _ = invert_image(sd3, square, plan_job(sd3, engine="flowedit", steps=20), check=False)
    assert record.meta["engine"]["n_max"] == 13
    record, _ = invert_image(flux, square, plan_job(flux, engine="flowedit", steps=7), check=False)
    assert record.meta["engine"]["n_max"] == 6


@pytest.mark.parametrize("engine,fam,params,message", [
    ("flowedit", "sd1", {}, "needs a rectified-flow model"),
    ("flowedit", "sd3", {"n_max": 60}, "n_min < n_max <= steps"),
    ("rf-inversion", "flux", {"gamma": 2.0}, "--gamma 2.0"),
    ("rf-inversion", "flux", {"start": 0.5, "stop": 0.2}, "start <= stop"),
])
def test_bad_flow_engine_options(tiny, square, engine, fam, params, message):
    _, model = tiny(fam)
    with pytest.raises(UsageError, match=message):
        invert_image(model, square, plan_job(model, engine=engine, params=params), check=False)
