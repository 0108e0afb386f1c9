"""One round of the engines benchmark for the engines whose edit ratio looked changed (and ddim as a
control), with whichever diffedit PYTHONPATH selects; prints one JSON line per engine."""
import json, sys, time
time.perf_counter = time.process_time  # CPU time of this one-threaded process: robust to other jobs on the machine
import torch
torch.set_num_threads(1)
import numpy as np, torch
from PIL import Image
from diffedit.families import adapter_for
try:
    from lab.benchmarks.engines import measure
    from lab.benchmarks.overhead import measure as overhead, mid_size_sd1
except ImportError:  # the old layout
    from diffedit.benchmarks.engines import measure
    from diffedit.benchmarks.overhead import measure as overhead, mid_size_sd1
pipe = mid_size_sd1(); pipe.set_progress_bar_config(disable=True)
model = adapter_for(pipe, "sd1")
a = np.full((256, 256, 3), 240, np.uint8); a[64:128, 64:128] = (220, 30, 30)
image = Image.fromarray(a)
print(json.dumps({"version": sys.argv[1], **overhead("mid-sd1", pipe, 256, 20, 3)}), flush=True)
for engine in sys.argv[2:]:
    row = measure(model, image, engine, 20, 1)
    print(json.dumps({"version": sys.argv[1], **row}), flush=True)
