"""The metrics.json schema: exact round trip of real files, unknown keys kept, other schema
versions and non-metrics files refused with one clear line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from jas_prune.errors import MetricsSchemaError
from jas_prune.metrics import (SCHEMA_VERSION, ExportRecord, Metrics, PrunedEntry, SpeedupRecord, read_metrics)

#: metrics.json of `jas-prune recipe run recipes/quickstart.yaml --set data.images_per_class=4
#: --set attribution.steps=2`, written before the schema (so: version 1), paths made relative
QUICKSTART_V1 = Path(__file__).parent / "data" / "metrics-quickstart-v1.json"


def _quickstart() -> dict:
    return {"schema_version": SCHEMA_VERSION, **json.loads(QUICKSTART_V1.read_text())}


def test_every_section_of_a_real_run_round_trips_exactly():
    data = _quickstart()
    assert set(data) == {"schema_version", "data", "locate", "locate_test", "fingerprint", "dense", "masks", "paper",
                         "pruned", "export", "run"}
    m = Metrics.from_dict(copy.deepcopy(data))
    assert m.to_dict() == data
    assert json.dumps(m.to_dict()) == json.dumps(data)  # same key order too
    # typed fields, no dict digging
    assert m.dense.top1 == data["dense"]["top1"] and m.locate_test.methods == ["jas", "activation",
                                                                               "influence_pattern"]
    assert m.paper.cls_mask.results["random"][0].top5 == data["paper"]["cls_mask"]["results"]["random"][0]["top5"]
    assert m.paper.intervention["jas"].removal_acc_dev == data["paper"]["intervention"]["jas"]["removal_acc_dev"]
    assert m.paper.semantic.auc == data["paper"]["semantic"]["auc"]
    assert [e.method for e in m.pruned] == ["jas", "vit_slim", "magnitude", "activation", "random"]
    assert m.pruned[0].importance == "mean_abs_centered" and "importance" not in m.pruned[1].to_dict()
    assert m.export[1].latency_at(32).latency_ms_p50 == data["export"][1]["latency"][1]["latency_ms_p50"]
    assert m.export[1].latency_at(7) is None and m.dense_export().model == "dense"
    assert {e.width_signature() for e in m.pruned} == {tuple((b, 128) for b in range(6))}
    assert m.locate.shown_settings() == {"steps": 2, "topk": 1, "scope": "all", "formula": "ig",
                                         "quadrature": "left", "candidates": "layer_scaled", "target": "label"}


def test_unknown_keys_survive_in_extra_and_absent_keys_stay_absent():
    data = _quickstart()
    data["pruned"][0]["sparsity_pattern"] = {"kind": "2:4", "axis": 1}  # added by later work
    data["export"][0]["latency"][0]["cpu_model"] = "x"
    data["paper"]["new_protocol"] = [1, 2]
    data["budget"] = {"macs": 0.6}
    del data["run"]  # a run that stopped before its end
    del data["pruned"][1]["finetune"]
    m = Metrics.from_dict(copy.deepcopy(data))
    assert m.pruned[0].extra == {"sparsity_pattern": {"kind": "2:4", "axis": 1}}
    assert m.extra == {"budget": {"macs": 0.6}} and m.run is None and m.pruned[1].finetune is None
    assert m.to_dict() == data


def test_sections_built_in_code_write_every_key_the_writer_always_sets():
    e = PrunedEntry(method="jas", ratio=0.5, top1=0.8, checkpoint="pruned-jas-r50.safetensors")
    d = e.to_dict()
    assert d["classes"] is None and d["finetune"] is None and "importance" not in d  # JAS-only key left out
    assert PrunedEntry.from_dict(d).to_dict() == d and e.stem == "pruned-jas-r50"
    assert Metrics().to_dict() == {"schema_version": SCHEMA_VERSION}
    m = Metrics.from_dict({"schema_version": SCHEMA_VERSION, "dense": {"top1": 0.5}})
    m.pruned = [e]  # a stage adding its section to metrics read back on --resume
    assert m.to_dict()["pruned"] == [d]
    rec = ExportRecord(model="dense")
    rec.latency.append(ExportRecord.from_dict({"model": "x", "latency": [{"batch_size": 1, "speedup": {
        "reference": "dense", "median": 1.2, "low": 1.1, "high": 1.3}}]}).latency[0])
    assert isinstance(rec.latency[0].speedup, SpeedupRecord) and rec.to_dict()["latency"][0]["speedup"]["low"] == 1.1


def test_version_1_file_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(MetricsSchemaError) as err:
        read_metrics(QUICKSTART_V1)
    assert str(err.value) == (f"{QUICKSTART_V1}: written by an older jas-prune (metrics schema version 1); this "
                              "jas-prune reads version 2: rerun the recipe into a new --out directory")
    newer = tmp_path / "metrics.json"
    newer.write_text(json.dumps({**_quickstart(), "schema_version": 3}))
    with pytest.raises(MetricsSchemaError, match=r"metrics.json: written by another jas-prune \(metrics schema "
                                                 r"version 3\); this jas-prune reads version 2: rerun"):
        read_metrics(newer)


@pytest.mark.parametrize("text,why", [("{not json", "not a metrics file (not valid JSON"),
                                      ("[1, 2]", "not a metrics file (a JSON mapping expected, got list)"),
                                      ('{"schema_version": 2, "dense": {"top5": 1.0}}', "dense.top1: missing"),
                                      ('{"schema_version": 2, "pruned": {"a": 1}}', "pruned: expected a list"),
                                      ('{"schema_version": 2, "paper": {"cls_mask": 3}}',
                                       "paper.cls_mask: expected a mapping, got int")])
def test_broken_files_name_the_file_and_the_problem(tmp_path, text, why):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(MetricsSchemaError) as err:
        read_metrics(path)
    assert str(err.value).startswith(f"{path}: {why}") and "\n" not in str(err.value)
