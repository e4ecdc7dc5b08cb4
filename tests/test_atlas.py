"""The neuron atlas: top-k images and heatmaps against brute force, path statistics against a
direct count, the page and the CLI's refusals."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch

from jas_prune.atlas.activations import neuron_activations, scoped
from jas_prune.atlas.colour import colour_check
from jas_prune.atlas.select import Neuron, class_path_neurons, neuron_use, parse_neurons
from jas_prune.cli import main
from jas_prune.data import build_source, model_transform
from jas_prune.errors import InvalidArgumentError
from jas_prune.neurons import capture


@pytest.mark.parametrize("scope", ["cls", "all"])
def test_top_images_and_heatmaps_are_the_brute_force_ones(tiny_vit, scope):
    model = tiny_vit(depth=2)
    source = build_source("shapes", seed=0, images_per_class=2)
    samples = source.subset("all")[:23]
    neurons = [Neuron(1, 5), Neuron(0, 3), Neuron(1, 0)]
    t = model_transform(model)
    # batches of 5: the running top-k is merged across batches, ties and all
    got = neuron_activations(model, samples, t, neurons, scope=scope, num_classes=48, k=4, batch_size=5)
    x = torch.stack([t(_image(s)) for s in samples])
    hiddens, _ = capture(model, x, layers=[0, 1])
    for m, n in enumerate(neurons):
        h = hiddens[n.block][:, :, n.index : n.index + 1]  # [N, T, 1]
        act = scoped(h, scope)[:, 0].double()
        order = torch.sort(act, descending=True, stable=True).indices[:4]
        assert got.top_positions[m].tolist() == order.tolist()
        torch.testing.assert_close(got.top_values[m].double(), act[order].float().double(), rtol=1e-5, atol=1e-6)
        # the heatmap is the neuron's activation at every patch token, on the patch grid
        maps = h[order, 1:, 0].reshape(4, *got.grid)
        torch.testing.assert_close(got.top_maps[m], maps, rtol=1e-5, atol=1e-6)
        labels = torch.tensor([s.label for s in samples])
        for c in labels.unique().tolist():
            torch.testing.assert_close(got.mean[c, m].double(), act[labels == c].mean(), rtol=1e-4, atol=1e-6)
            assert got.max[c, m] == pytest.approx(float(act[labels == c].max()), rel=1e-5, abs=1e-6)
    assert got.grid == (4, 4) and got.images == 23 and int(got.count.sum()) == 23
    assert torch.isnan(got.mean[47]).all()  # a class without images


def _image(sample):
    from jas_prune.data import ImageDataset

    return ImageDataset([], None).load_image(sample)


def _chunks(paths, labels, jas, size=3):
    return [SimpleNamespace(paths={"jas": paths[i:i + size]}, labels=labels[i:i + size], jas={"jas": jas[i:i + size]},
                            layers=[0, 2]) for i in range(0, len(labels), size)]


def test_path_neurons_frequency_and_jas_share_match_a_direct_count():
    g = torch.Generator().manual_seed(1)
    paths = torch.randint(0, 4, (10, 2, 2), generator=g)
    paths[:, :, 1] = (paths[:, :, 0] + 1) % 4  # K=2 distinct neurons per path
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    jas = torch.rand(10, generator=g) - 0.2
    top, freq, layers = class_path_neurons(_chunks(paths, labels, jas), "jas", [2, 0], width=4)
    assert layers == [0, 2]
    for q, c in enumerate([2, 0]):
        sel = paths[labels == c]
        for j in range(2):
            counts = torch.bincount(sel[:, j].flatten(), minlength=4)
            assert int(top[q, j]) == int(torch.argmax(counts))  # first maximum: lowest index on ties
            assert float(freq[q, j]) == pytest.approx(float(counts.max()) / len(sel))
    neurons = [Neuron(0, 1), Neuron(2, 3)]
    use = neuron_use(_chunks(paths, labels, jas), "jas", neurons, [0, 2], num_classes=3)
    for c in range(3):
        sel, w = paths[labels == c], jas[labels == c].abs().double()
        for m, (row, idx) in enumerate([(0, 1), (1, 3)]):
            on = (sel[:, row] == idx).any(dim=1).double()
            assert float(use.frequency[c, m]) == pytest.approx(float(on.mean()))
            assert float(use.jas_share[c, m]) == pytest.approx(float((on * w).sum() / w.sum()), rel=1e-5)


def test_neuron_specs_are_parsed_and_checked():
    assert parse_neurons(["0:7", " 2 : 1", "0:7", "-1:3"], [0, 1, 2], [8, 8, 8]) == \
        [Neuron(0, 7), Neuron(2, 1), Neuron(2, 3)]
    for spec, says in (("0-7", "is not block:index"), ("5:1", "was not located"), ("1:8", "has 8 FFN neurons")):
        with pytest.raises(InvalidArgumentError, match=says):
            parse_neurons([spec], [0, 1, 2], [8, 8, 8])


def test_colour_check_ratio_is_same_colour_over_other_colours():
    names = ["red-circle", "red-ring", "blue-circle", "blue-ring"]
    acts = SimpleNamespace(neurons=[Neuron(0, 4)], count=torch.tensor([2, 2, 1, 3]),
                           mean=torch.tensor([[3.0], [1.0], [1.0], [0.5]]))
    rows = colour_check(names, [(0, 0), (3, 0)], acts, acts)
    assert rows[0]["colour"] == "red" and rows[0]["neuron"] == "0:4" and rows[0]["block"] == 0
    assert rows[0]["test_ratio"] == pytest.approx(2.0 / ((1.0 + 1.5) / 4))
    assert rows[1]["colour"] == "blue" and rows[1]["test_diff"] == pytest.approx((1.0 + 1.5) / 4 - 2.0)
    acts.mean[2:] = -1.0  # a negative mean of the other colours: no ratio, still a difference
    assert colour_check(names, [(0, 0)], acts, acts)[0]["test_ratio"] is None
    assert colour_check(["cat", "dog"], [(0, 0)], acts, acts) is None
    assert colour_check(["red-circle", "red-ring"], [(0, 0)], acts, acts) is None  # no other colour


class _Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.tiles, self.external = set(), set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if "tile" in a.get("class", "").split():
            self.tiles.add(a["class"].split()[-1])
        if tag in ("img", "script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))


RECIPE = """version: 1
data: {images_per_class: 3, batch_size: 16}
attribution: {steps: 2, scope: all, formula: ig}
report: {atlas: {images: 3, classes: [red-circle, blue-star, 5]}}
"""


def test_recipe_run_builds_the_atlas_and_the_cli_refuses_bad_input(tmp_path, tiny_builtin, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(RECIPE)
    out = tmp_path / "run"
    assert main(["recipe", "run", str(r), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    atlas = metrics["atlas"]
    assert atlas["classes"] == [0, 5, 21] and atlas["k"] == 3 and atlas["images"] == 96
    assert atlas["seconds"] > 0 and atlas["peak_rss_mb"] > 0 and len(atlas["figures"]) == 3
    assert {r["class"] for r in atlas["colour_check"]} == {"red-circle", "red-star", "blue-star"}
    assert set(atlas["colour_by_block"]) == {"0", "1"}
    page = (out / "atlas" / "atlas.html").read_text()
    parsed = _Parsed()
    parsed.feed(page)
    # self-contained: nothing loaded from elsewhere, every picture a data: URI defined in the page
    urls = re.findall(r"url\(([^)]{0,40})", page)
    assert parsed.external == [] and urls and all(u.startswith("data:image/png;base64,") for u in urls)
    assert parsed.tiles and all(f".{t}{{background-image:url(data:" in page for t in parsed.tiles)
    assert {f"class-{c}" for c in (0, 5, 21)} <= parsed.ids
    assert {f"neuron-{n.replace(':', '-')}" for n in atlas["neurons"]} <= parsed.ids
    for name in ("red-circle", "red-star", "blue-star"):
        assert name in page
    assert "## Neuron atlas" in (out / "report.md").read_text()
    capsys.readouterr()
    # the CLI: extra neurons; alone they are all the atlas shows
    assert main(["atlas", str(out), "--neurons", "1:3,0:60"]) == 0
    again = json.loads((out / "metrics.json").read_text())["atlas"]
    assert again["neurons"] == ["1:3", "0:60"] and again["classes"] == [] and again["figures"] == []
    assert not list((out / "atlas").glob("class-*.png"))  # the earlier atlas's figures are gone
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    for args in (["atlas", str(tmp_path / "nowhere")], ["atlas", str(tmp_path)],
                 ["atlas", str(out), "--neurons", "1.3"],
                 ["atlas", str(out), "--neurons", "2:1"], ["atlas", str(out), "--neurons", "0:64"],
                 ["atlas", str(out), "--classes", "purple-blob"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("jas-prune: error:") and "Traceback" not in err[0], (args, err)
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / "nowhere").exists()
    # a class the data does not have: refused before the locating the atlas needs, nothing written
    r.write_text(RECIPE.replace("blue-star", "purple-blob"))
    assert main(["recipe", "run", str(r), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report.atlas.classes" in err[0] and "purple-blob" in err[0], err
    assert not (tmp_path / "bad" / "paths").exists()
    chromium = shutil.which("chromium")
    if chromium is None:  # the screenshot is an optional extra: Debian's chromium package
        return
    shot = tmp_path / "atlas.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1200,800", f"--screenshot={shot}",
                    (out / "atlas" / "atlas.html").as_uri() + "#neuron-1-3"], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000
