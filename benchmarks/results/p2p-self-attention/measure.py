# direct and ddim-p2p on the mid-size SD1 at 256², 20 steps, one repeat (lab.benchmarks.engines.measure).
import json
from lab.benchmarks.overhead import use_cpu_time
use_cpu_time()
from lab.benchmarks import engines as E
pipe = E.mid_size_sd1(); pipe.set_progress_bar_config(disable=True)
model = E.adapter_for(pipe, "sd1")
image = E._scene(256)
print(json.dumps([E.measure(model, image, e, 20, 1) for e in ("direct", "ddim-p2p")]))
