import json

import pytest
import torch

from jas_prune.aggregate import aggregate, load_masks, save_masks
from jas_prune.cli import main
from jas_prune.errors import CheckpointError, FingerprintMismatchError
from jas_prune.pathstore import PathStore


def _brute(paths, scores, labels, C, n, K):
    util = torch.zeros(C, paths.shape[1], n)
    for img in range(paths.shape[0]):
        for l in range(paths.shape[1]):
            for j in paths[img, l]:
                util[labels[img], l, j] += 1
    return util


def test_aggregate_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    N, L, K, n, C = 40, 3, 2, 7, 4
    paths = torch.stack([torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(L)]) for _ in range(N)])
    scores = torch.randn(N, L, n, generator=g)
    labels = torch.arange(N) % (C - 1)  # class C-1 has no images
    m = aggregate(paths, scores, labels, num_classes=C, widths=n, topk=3, layers=[0, 1, 2],
                  class_names=list("abcd"))
    counts = _brute(paths, scores, labels, C, n, K)
    for c in range(C - 1):
        torch.testing.assert_close(m.utilisation[c], counts[c] / counts[c].sum(dim=1, keepdim=True))
        torch.testing.assert_close(m.importance[c], scores[labels == c].mean(0))
        for l in range(L):
            # the mask holds K most frequent neurons; any neuron outside is no more frequent
            inside = counts[c, l][m.topk[c, l]]
            outside = counts[c, l][~m.topk[c, l]]
            assert m.topk[c, l].sum() == 3 and inside.min() >= outside.max()
    assert m.counts.tolist() == [14, 13, 13, 0]
    assert not m.topk[C - 1].any() and torch.isnan(m.importance[C - 1]).all()
    flat = m.utilisation.reshape(C, -1)
    cos = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    assert m.similarity[0, 1] == pytest.approx(cos.item(), abs=1e-6)
    assert m.similarity[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_importance_aggregations_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    N, L, n, C = 12, 2, 6, 3
    paths = torch.randint(0, n, (N, L, 1), generator=g)
    scores = torch.randn(N, L, n, generator=g)
    labels = torch.arange(N) % C
    m = aggregate(paths, scores, labels, num_classes=C, widths=n, topk=2, layers=[0, 1], class_names=list("abc"))
    for c in range(C):
        s = scores[labels == c]
        torch.testing.assert_close(m.importance_for("mean")[c], s.mean(0))
        torch.testing.assert_close(m.importance_for("mean_abs")[c], s.abs().mean(0))
        # centred: each (image, layer) row minus its median over the n candidates, by hand
        centred = torch.stack([torch.stack([(s[i, l] - s[i, l].sort().values[(n - 1) // 2]).abs()
                                            for l in range(L)]) for i in range(len(s))])
        torch.testing.assert_close(m.importance_for("mean_abs_centered")[c], centred.mean(0))
    # adding a per-(image, layer) constant (the path's share of every candidate score) changes nothing
    shifted = aggregate(paths, scores + torch.randn(N, L, 1, generator=g), labels, num_classes=C, widths=n, topk=2,
                        layers=[0, 1], class_names=list("abc"))
    torch.testing.assert_close(shifted.importance_for("mean_abs_centered"), m.importance_for("mean_abs_centered"))
    save_masks(m, tmp_path)
    back = load_masks(tmp_path)
    for how in ("mean", "mean_abs", "mean_abs_centered"):
        torch.testing.assert_close(back.importance_for(how), m.importance_for(how))
    with pytest.raises(ValueError, match="aggregation: 'median' is not one of mean, mean_abs"):
        back.importance_for("median")
    back.importance_by = {"mean": back.importance}  # a masks file written before the option existed
    with pytest.raises(ValueError, match="'mean_abs' is not stored in these masks"):
        back.importance_for("mean_abs")


def test_streaming_over_chunks_equals_one_batch():
    import types

    from jas_prune.aggregate import aggregate_store

    g = torch.Generator().manual_seed(2)
    N, L, n, C = 50, 3, 8, 4
    paths = torch.randint(0, n, (N, L, 2), generator=g)
    scores, labels = torch.randn(N, L, n, generator=g), torch.randint(0, C, (N,), generator=g)
    one = aggregate(paths, scores, labels, num_classes=C, widths=n, topk=3, layers=[1, 2, 4], class_names=list("abcd"))
    chunks = [types.SimpleNamespace(paths={"jas": paths[i:i + 16]}, scores={"jas": scores[i:i + 16]},
                                    labels=labels[i:i + 16], layers=[1, 2, 4]) for i in range(0, N, 16)]
    streamed = aggregate_store(iter(chunks), "jas", num_classes=C, widths=n, topk=3, class_names=list("abcd"))
    assert streamed.layers == [1, 2, 4] and torch.equal(streamed.counts, one.counts)
    assert torch.equal(streamed.topk, one.topk)
    for how in ("mean", "mean_abs", "mean_abs_centered"):
        torch.testing.assert_close(streamed.importance_for(how), one.importance_for(how))
    torch.testing.assert_close(streamed.similarity, one.similarity)
    with pytest.raises(ValueError, match="no located images"):
        aggregate_store(iter([]), "jas", num_classes=C, widths=n, topk=3, class_names=list("abcd"))


def test_ties_broken_by_mean_dense_score():
    paths = torch.tensor([[[0]], [[1]]])  # neurons 0 and 1 each used once by class 0
    scores = torch.tensor([[[0.1, 0.9, 0.0]], [[0.1, 0.9, 0.0]]])
    m = aggregate(paths, scores, torch.tensor([0, 0]), num_classes=1, widths=3, topk=1, layers=[0],
                  class_names=["a"])
    assert m.topk_indices[0, 0, 0] == 1


def test_save_load_and_fingerprint(tmp_path):
    m = aggregate(torch.zeros(2, 1, 1, dtype=torch.long), torch.rand(2, 1, 4), torch.tensor([0, 1]), num_classes=2,
                  widths=4, topk=1, layers=[3], class_names=["x", "y"], fingerprint={"model": "abc"})
    save_masks(m, tmp_path)
    back = load_masks(tmp_path)
    assert back.layers == [3] and back.class_names == ["x", "y"] and torch.equal(back.topk, m.topk)
    back.check_model("abc")
    with pytest.raises(FingerprintMismatchError, match="different model"):
        back.check_model("def")
    with pytest.raises(CheckpointError, match="no class masks"):
        load_masks(tmp_path / "nowhere")


def test_same_masks_same_bytes(tmp_path):
    """safetensors orders several metadata keys at random: one key keeps the file reproducible
    (and files written before, with one key per entry, still load)."""
    from safetensors.torch import load_file, save_file

    m = aggregate(torch.zeros(2, 1, 1, dtype=torch.long), torch.rand(2, 1, 4), torch.tensor([0, 1]), num_classes=2,
                  widths=4, topk=1, layers=[3], class_names=["x", "y"], fingerprint={"model": "abc"})
    files = [save_masks(m, tmp_path / f"m{i}.safetensors").read_bytes() for i in range(6)]
    assert len(set(files)) == 1
    old = tmp_path / "old.safetensors"
    save_file(load_file(tmp_path / "m0.safetensors"), old,
              metadata={"layers": "[3]", "class_names": '["x", "y"]', "fingerprint": '{"model": "abc"}'})
    back = load_masks(old)
    assert back.layers == [3] and back.class_names == ["x", "y"] and back.fingerprint == {"model": "abc"}


RECIPE = """version: 1
data: {images_per_class: 3, batch_size: 16}
attribution: {method: [jas, activation], steps: 3, topk: 2}
masks: {topk: 2}
evaluate: {intervention: true}
"""


def test_run_locate_masks_intervention_and_resume(tmp_path, tiny_builtin, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(RECIPE)
    out = tmp_path / "run"
    assert main(["recipe", "run", str(r), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["locate"]["images"] == 96 and metrics["locate"]["methods"] == ["jas", "activation"]
    assert set(metrics["paper"]["intervention"]) == {"jas", "activation", "influence_pattern"}
    masks = load_masks(out)
    assert masks.topk.shape == (48, 2, 64) and masks.topk.sum() == 48 * 2 * 2
    chunks = sorted((out / "paths" / "probe").glob("chunk-*.safetensors"))
    assert len(chunks) == 3  # 96 probe images / 32 per chunk
    store = PathStore(out / "paths" / "probe", chunk_size=32)
    full, light = store.read(96), store.read(96, scores=False)
    assert full.scores["jas"].shape == (96, 2, 64) and light.scores == {}
    assert light.ids == full.ids and all(torch.equal(light.paths[k], full.paths[k]) for k in full.paths)
    # lose a chunk, resume: only it is recomputed and the masks are identical
    chunks[1].unlink()
    assert main(["recipe", "run", str(r), "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["locate"]["images_this_run"] == 32 and again["locate"]["chunks_resumed"] == 2
    assert torch.equal(load_masks(out).topk, masks.topk)
    # a different setting refuses to resume and names what differs
    capsys.readouterr()
    assert main(["recipe", "run", str(r), "--out", str(out), "--resume", "--set", "attribution.steps=5"]) == 2
    assert "attribution (attribution.steps)" in capsys.readouterr().err
