"""Memory and time of the neuron atlas at ViT-B geometry (3072 neurons x 12 blocks), random init.

Each measurement runs in a fresh process and reports the growth of the process's peak RSS over
the atlas's own work (model loaded and warmed up first), so the figures are the atlas's cost:

- ``activations N``: the streamed activation pass of 96 neurons (8 per block) over N shapes
  images resized to 224 px (top-6 with patch maps, per-class moments), with the growth after
  every batch of 8 (it levels off once the allocator has settled; it does not follow N);
- ``paths N``: the two passes over N images' ``paths/`` chunks (synthetic, 12 x K=1 of 3072, 64
  classes, 32 images per chunk) that choose the neurons and count their use.

Bounded memory means the growth does not follow N. Run (CPU; ViT-B at 2 s per image on a loaded
2-core machine: about 10 minutes)::

    python -m benchmarks.atlas_memory
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def activations(n: int) -> dict:
    import timm
    import torch

    from jas_prune.atlas.activations import _RunningTopK, neuron_activations
    from jas_prune.atlas.select import Neuron
    from jas_prune.data import build_source, model_transform

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=48).eval()
    source = build_source("shapes", seed=0, images_per_class=max(2, n // 48 + 2))
    samples = source.subset("all")[:n]
    g = torch.Generator().manual_seed(0)
    neurons = [Neuron(b, int(i)) for b in range(12) for i in torch.randperm(3072, generator=g)[:8]]
    t = model_transform(model)
    with torch.no_grad():
        model(torch.zeros(8, 3, 224, 224))  # warm up: the allocator's first batch is not the atlas's
    before, t0 = _rss_mb(), time.perf_counter()
    trace = []  # peak RSS growth after each batch: flat once the allocator has settled
    merge = _RunningTopK.add

    def add(self, *args):
        merge(self, *args)
        trace.append(round(_rss_mb() - before, 1))

    _RunningTopK.add = add
    acts = neuron_activations(model, samples, t, neurons, scope="all", num_classes=48, k=6, batch_size=8)
    return {"what": "activations", "images": n, "neurons": len(neurons), "seconds": time.perf_counter() - t0,
            "rss_growth_mb": _rss_mb() - before, "state_mb": acts.state_bytes() / 2**20, "growth_per_batch": trace}


def paths(n: int) -> dict:
    from types import SimpleNamespace

    import torch

    from jas_prune.atlas.select import Neuron, class_path_neurons, neuron_use

    def chunks():
        g = torch.Generator().manual_seed(0)
        for i in range(0, n, 32):
            b = min(32, n - i)
            yield SimpleNamespace(paths={"jas": torch.randint(0, 3072, (b, 12, 1), generator=g)},
                                  labels=torch.randint(0, 64, (b,), generator=g), jas={"jas": torch.rand(b)},
                                  layers=list(range(12)))

    before, t0 = _rss_mb(), time.perf_counter()
    top, _, layers = class_path_neurons(chunks(), "jas", list(range(64)), 3072)
    neurons = sorted({Neuron(layers[j], int(top[q, j])) for q in range(64) for j in range(12)})
    neuron_use(chunks(), "jas", neurons, layers, 64)
    return {"what": "paths", "images": n, "neurons": len(neurons), "seconds": time.perf_counter() - t0,
            "rss_growth_mb": _rss_mb() - before}


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(json.dumps({"activations": activations, "paths": paths}[sys.argv[1]](int(sys.argv[2]))))
        sys.exit(0)
    for what, sizes in (("paths", (3200, 12800)), ("activations", (160,))):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, what, str(n)], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
