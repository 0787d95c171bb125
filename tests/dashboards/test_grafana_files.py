"""The Grafana provisioning files and dashboards are consistent: each dashboard parses, uses the
provisioned data source, has unique ids and only variables it defines. (Their queries are checked
against a real Prometheus in test_prometheus.py.)"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.dashboards.catalog import DASHBOARDS, DATASOURCE_UID, GRAFANA_JSON, dashboard_exprs

PROVISIONING = DASHBOARDS / "grafana" / "provisioning"


def test_datasource_and_provider_provisioning():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "mujina.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus" and source["url"].startswith("http")
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "mujina.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    # The README's commands mount the dashboards where the provider looks for them.
    assert provider["options"]["path"] in (DASHBOARDS / "README.md").read_text()


def test_dashboards_are_the_four_the_issue_names():
    assert sorted(p.stem for p in GRAFANA_JSON) == ["cluster", "contribution", "overview", "swarm"]
    uids = [json.loads(p.read_text())["uid"] for p in GRAFANA_JSON]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", GRAFANA_JSON, ids=[p.name for p in GRAFANA_JSON])
def test_dashboard_is_well_formed(path):
    doc = json.loads(path.read_text())
    assert doc["title"].startswith("mujina / ") and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == DATASOURCE_UID, f"{path.name}: {p['title']} uses another data source"
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys() and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], f"{path.name}: panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"].strip()
    dashboard_exprs(path)  # raises on a variable the dashboard does not define


def test_an_undefined_variable_is_caught(tmp_path):
    doc = json.loads(GRAFANA_JSON[0].read_text())
    doc["panels"][0]["targets"][0]["expr"] = 'mujina_active_workers{instance=~"$host"}'
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(AssertionError, match=r"unknown variable\(s\) \['host'\]"):
        dashboard_exprs(bad)
