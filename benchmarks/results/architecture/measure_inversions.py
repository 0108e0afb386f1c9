"""Direct's and DDIM's inversion time over their forwards' time, CPU time of one thread."""
import json, sys, time
time.perf_counter = time.process_time
import torch
torch.set_num_threads(1)
import numpy as np
from PIL import Image
from diffedit.families import adapter_for
from diffedit.jobs import invert_image
try:
    from diffedit.plan import plan_job
    job = lambda engine: dict(plan=plan_job(model, engine=engine, steps=20))  # noqa: E731
except ImportError:  # before the plan: options go to invert_image itself
    job = lambda engine: dict(engine=engine, steps=20)  # noqa: E731
try:
    from lab.benchmarks.engines import forward_seconds, _encode_seconds
    from lab.benchmarks.overhead import mid_size_sd1
except ImportError:
    from diffedit.benchmarks.engines import forward_seconds, _encode_seconds
    from diffedit.benchmarks.overhead import mid_size_sd1
pipe = mid_size_sd1(); pipe.set_progress_bar_config(disable=True)
model = adapter_for(pipe, "sd1")
a = np.full((256, 256, 3), 240, np.uint8); a[64:128, 64:128] = (220, 30, 30)
image = Image.fromarray(a)
fwd = forward_seconds(model, 1, 256)
for engine in ("ddim", "direct"):
    ratios = []
    for _ in range(3):
        _, inv = invert_image(model, image, **job(engine), prompt="a red circle on a white background", check=False)
        ratios.append((inv["seconds"] - _encode_seconds(model, image)) / (inv["nfe"] * fwd))
    print(json.dumps({"version": sys.argv[1], "engine": engine, "ratios": [round(r, 3) for r in ratios]}), flush=True)
