"""Peak memory of the VAE round trip (encode + decode) by image size, with and without tiling.

Each measurement runs in a fresh process (peak RSS is a high-water mark that never goes down): load
the model, note the resident size, encode and decode one image, report the peak and what the round
trip added. On a GPU the same code reports the allocator's peak instead. The UNet's share is left
out on purpose: on this 2-core CPU the toy UNet's attention at 2048² takes hours, not memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, resource, sys, torch
from diffedit.models import load_model
size, tiled = int(sys.argv[1]), sys.argv[2] == "1"
m = load_model(None, device="auto")
if tiled:
    m.pipe.vae.enable_tiling()
cuda = m.device.type == "cuda"
x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = torch.cuda.max_memory_allocated() if cuda else kib() * 1024
m.decode(m.encode_image(x))
after = torch.cuda.max_memory_allocated() if cuda else kib() * 1024
print(json.dumps({"peak_mib": after / 2**20, "added_mib": (after - before) / 2**20, "kind": "cuda" if cuda else "rss"}))
"""


def measure(size: int, tiled: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(size), "1" if tiled else "0"], capture_output=True,
                          check=True)
    out = json.loads(done.stdout.decode().splitlines()[-1])
    return {"size": size, "tiled": tiled, "peak_mib": round(out["peak_mib"], 1),
            "added_mib": round(out["added_mib"], 1), "memory": out["kind"]}


def run(sizes: tuple[int, ...] = (256, 512, 1024, 2048), untiled_max: int = 1024) -> list[dict]:
    rows = []
    for size in sizes:
        if size <= untiled_max:
            rows.append(measure(size, False))
        rows.append(measure(size, True))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| image | VAE tiling | peak memory (MiB) | added by the round trip (MiB) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']}² | {'on' if r['tiled'] else 'off'} | {r['peak_mib']} | {r['added_mib']} |")
    return "\n".join(lines)
