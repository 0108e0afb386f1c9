"""Adaptive guidance: CFG until the branches agree, then the conditional branch alone."""

from __future__ import annotations

import numpy as np
import pytest

from diffedit.errors import UsageError
from diffedit.guidance import GuidanceSpec
from diffedit.jobs import generate_image
from diffedit.plan import plan_job


def run(model, threshold):
    spec = GuidanceSpec(adaptive_threshold=threshold)
    image, result = generate_image(model, "a red cat", seed=3, steps=12, guidance_scale=5.0, guidance=spec,
                                   height=32, width=32)
    return np.asarray(image), result


def test_adaptive_guidance_drops_the_unconditional_branch_once_they_agree(tiny):
    _, model = tiny("sd1")
    plain, plain_result = run(model, None)
    default, _ = generate_image(model, "a red cat", seed=3, steps=12, guidance_scale=5.0, height=32, width=32)
    assert plain_result["forwards"] == {2: 12} and np.array_equal(plain, np.asarray(default))  # off: as before
    early, result = run(model, 0.2)
    assert result["forwards"][2] >= 1 and result["forwards"][1] >= 1  # CFG first, then one branch
    assert sum(result["forwards"].values()) == 12 and not np.array_equal(early, plain)


def test_adaptive_guidance_bad_input(cli, tmp_path):
    with pytest.raises(UsageError, match="must be a cosine similarity"):
        GuidanceSpec(adaptive_threshold=1.5).build(5.0)
    code, _, err = cli("generate", "x", "-o", tmp_path / "a.png", "--guidance", "pag", "--adaptive-guidance", 0.99)
    assert code == 2 and "--adaptive-guidance works with --guidance cfg" in err and not (tmp_path / "a.png").exists()


def test_deepcache_runs_the_deep_blocks_only_on_full_steps(tiny):
    _, model = tiny("sd1")
    unet = model.network
    mid_calls = []
    # a module inside the mid block runs only when the block really computes
    hook = unet.mid_block.resnets[0].register_forward_hook(lambda *_: mid_calls.append(1))
    try:
        before, _ = generate_image(model, "a red cat", seed=1, steps=12, height=32, width=32)
        mid_calls.clear()
        cached, result = generate_image(model, "a red cat", seed=1, steps=12, height=32, width=32, deepcache=3)
        assert result["full_steps"] == 4 and len(mid_calls) == 4  # steps 0, 3, 6, 9
        assert not np.array_equal(np.asarray(cached), np.asarray(before))
        after, _ = generate_image(model, "a red cat", seed=1, steps=12, height=32, width=32)
    finally:
        hook.remove()
    assert np.array_equal(np.asarray(after), np.asarray(before))  # the network is itself again
    assert all("forward" not in vars(block) for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])


def test_deepcache_bad_input(tiny):
    _, model = tiny("sd1")
    with pytest.raises(UsageError, match="at least 2"):
        generate_image(model, "a cat", steps=4, height=32, width=32, deepcache=1)
    _, flow = tiny("sd3")
    with pytest.raises(UsageError, match="needs a UNet"):
        generate_image(flow, "a cat", steps=4, deepcache=3)


def test_compiled_network_gives_the_eager_image(tiny_folder, cli, tmp_path):
    model = tiny_folder("sd1")
    args = ["generate", "a red cat", "-n", 3, "--seed", 2, "-H", 32, "-W", 32, "-m", model, "-q"]
    assert cli(*args, "-o", tmp_path / "eager.png")[0] == 0
    assert cli(*args, "--compile", "-o", tmp_path / "compiled.png")[0] == 0
    from PIL import Image

    diff = np.asarray(Image.open(tmp_path / "eager.png"), float) - np.asarray(Image.open(tmp_path / "compiled.png"), float)
    assert np.abs(diff).max() <= 1  # kernels fused by the compiler round differently
    code, _, err = cli(*args, "--compile", "--deepcache", 2, "-o", tmp_path / "x.png")
    assert code == 2 and "--compile cannot be combined" in err


def test_accelerators_on_edits(tiny, tmp_path):
    """On a ddim edit the accelerators act on the regeneration only; exact engines refuse them (they
    would no longer retrace their inversion); off, the edit is the same as before."""
    from PIL import Image

    from diffedit.jobs import edit_image

    _, model = tiny("sd1")
    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 8:20] = (220, 20, 20)
    src = Image.fromarray(a)
    edit = lambda **kw: edit_image(model, src, plan_job(model, steps=12), source_prompt="a red square",  # noqa: E731
                                   target_prompt="a blue square", **kw)
    plain, plain_result, _ = edit()
    assert plain_result["forwards"] == {1: 12, 2: 12}  # inversion at CFG 1, the edit at CFG 7.5
    fast, result, _ = edit(adaptive_guidance=0.2)
    assert result["forwards"][1] > 12 and result["forwards"][2] < 12  # CFG dropped during the edit
    assert not np.array_equal(np.asarray(fast), np.asarray(plain))
    cached, result, _ = edit(deepcache=3)
    assert result["full_steps"] == 4 and result["forwards"] == {1: 12, 2: 12}
    assert not np.array_equal(np.asarray(cached), np.asarray(plain))
    again, _, _ = edit()
    assert np.array_equal(np.asarray(again), np.asarray(plain))  # the network is restored
    for engine in ("ddpm-ef", "bdia", "direct", "infedit"):
        with pytest.raises(UsageError, match="no longer retraces"):
            edit_image(model, src, plan_job(model, engine=engine, steps=12), source_prompt="a red square", target_prompt="a blue square", deepcache=3)
