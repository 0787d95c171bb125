"""The shipped Prometheus config, alert rules and Grafana dashboards against a real Prometheus
scraping a live coordinator (tests/dashboards/conftest.py).

Every PromQL expression of every dashboard panel and alert rule is read from the files and must
return at least one series after the run, so a renamed metric or a typo breaks the test. Every exporter
runs (coordinator with a swarm run, worker daemon, cluster trainer); an exporter added later without a
test run would make its expressions skip, naming it (catalog.PENDING)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import wait_until
from tests.dashboards.catalog import PENDING, PROMETHEUS_YML, RULES_YML, all_exprs

EXPRS = all_exprs()
# Alerts the run must trigger (pending: true but `for` has not elapsed) and one it must not.
EXPECTED_ALERTS = {"MujinaTasksDead", "MujinaLeaseExpiryHigh", "MujinaEvalLossRising", "MujinaExpertWithoutHolders"}
QUIET_ALERTS = {"MujinaNoActiveWorkers", "MujinaTargetDown"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does it)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config_and_rules():
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(RULES_YML)]):
        out = promtool(*args)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    # The check above means something: a misspelt function makes promtool fail.
    doc = yaml.safe_load(RULES_YML.read_text())
    doc["groups"][0]["rules"][0]["expr"] = "rat(mujina_leases_expired_total[5m]) > 0"
    bad = tmp_path / "rules.yml"
    bad.write_text(yaml.safe_dump(doc))
    out = promtool("check", "rules", str(bad))
    assert out.returncode != 0 and "rat" in out.stdout + out.stderr


def test_the_files_hold_expressions_for_every_part():
    where = {e.where.split(":")[0] for e in EXPRS}
    assert where == {"overview.json", "contribution.json", "swarm.json", "cluster.json", "rules.yml"}
    assert len(EXPRS) >= 40


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_every_metric_is_live_or_pending(live):
    revived = sorted(set(PENDING) & live.metric_names)
    assert not revived, (f"{revived} are exported by a live exporter now: delete them from catalog.PENDING so "
                         "their panels and alerts are checked")
    unknown = {(m, e.where) for e in EXPRS for m in e.metrics - live.metric_names - PENDING.keys()}
    assert not unknown, ("metrics that no live exporter serves and metrics.md does not list (renamed?): "
                         + "; ".join(f"{m} in {w}" for m, w in sorted(unknown)))


@pytest.mark.parametrize("expr", EXPRS, ids=[e.where for e in EXPRS])
@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_expression_returns_series(expr, live, prom):
    waiting = sorted({PENDING[m] for m in expr.metrics - live.metric_names if m in PENDING})
    if waiting:
        pytest.skip(f"waits for exporter: {'; '.join(waiting)}")
    series = prom.query(expr.promql)
    assert series, f"{expr.where}: `{expr.promql}` returned no series after the run"


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_prometheus_loads_the_rules_and_the_run_triggers_the_right_alerts(prom):
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    shipped = [r["alert"] for g in yaml.safe_load(RULES_YML.read_text())["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(shipped)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    def active() -> set[str]:
        return {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}

    wait_until(lambda: EXPECTED_ALERTS <= active(), f"alerts {sorted(EXPECTED_ALERTS)}")
    assert not QUIET_ALERTS & active()
    states = {a["labels"]["alertname"]: a for a in prom.api("alerts")["alerts"]}
    assert states["MujinaTasksDead"]["labels"]["kind"] == "eval"
    assert states["MujinaEvalLossRising"]["labels"]["run"] == "dash"
    assert states["MujinaEvalLossRising"]["labels"]["phase"] == "pretrain"
    frozen = {(a["labels"]["layer"], a["labels"]["expert"]) for a in prom.api("alerts")["alerts"]
              if a["labels"]["alertname"] == "MujinaExpertWithoutHolders"}
    assert frozen == {("0", "2"), ("0", "3")}


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_the_coordinator_exports_the_swarm_round_and_the_holders_of_each_expert(prom):
    # One round closed; the one slot held experts 0 and 1 of the tiny MoE's one layer, 2 and 3 were frozen.
    assert prom.value('mujina_swarm_round{run="dash"}') == 1
    holders = {s["metric"]["expert"]: float(s["value"][1])
               for s in prom.query('mujina_swarm_expert_holders{run="dash",layer="0"}')}
    assert holders == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}
    assert prom.value('mujina_swarm_rounds_total{outcome="local_only"}') == 1


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_every_loss_carries_run_and_phase(prom):
    # The cluster trainer (train.phase, default pretrain), the swarm round's loss as validated by the
    # coordinator, the eval tasks (payload.phase) and the worker's inner loss: one label set for the overview.
    def labels(promql):
        return [(s["metric"].get("run"), s["metric"]["phase"]) for s in prom.query(promql)]

    assert labels("mujina_train_loss") == [("cluster", "pretrain")] == labels("mujina_train_eval_loss")
    assert labels('mujina_latest_loss{kind="train"}') == [("dash", "swarm")]
    assert labels('mujina_latest_loss{kind="eval"}') == [("dash", "pretrain")]
    assert labels("mujina_swarm_inner_loss") == [("dash", "swarm")]
    assert prom.value('mujina_latest_loss{kind="train"}') > 0 and prom.value("mujina_swarm_inner_loss") > 0


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_the_worker_daemon_exports_its_task_and_state_series(prom):
    # One generate task completed; the other outcomes exist at 0 from start-up, so failure panels and
    # alerts have a series before the first failure; the daemon idles waiting for work afterwards.
    from worker.metrics import OUTCOMES, STATES

    for outcome in OUTCOMES:
        want = 1.0 if outcome == "completed" else 0.0
        assert prom.value(f'mujina_worker_tasks_total{{kind="generate",outcome="{outcome}"}}') == want, outcome
    assert prom.value('mujina_worker_output_tokens_total{kind="generate"}') > 0
    assert prom.value('mujina_worker_task_seconds_count{kind="generate"}') == 1
    assert prom.value("mujina_worker_pending_uploads") == 0
    assert {s["metric"]["state"]: float(s["value"][1]) for s in prom.query("mujina_worker_state")} == \
        {s: float(s == "waiting_for_work") for s in STATES}


def test_the_phase_of_a_validated_loss():
    from coordinator.metrics import loss_phase

    assert loss_phase("train", {}) == "swarm" and loss_phase("eval", {}) == "eval"
    assert loss_phase("eval", {"phase": "sft"}) == "sft"
    # a label value the dashboards could not show (spaces, too long, not a string) falls back to the kind's
    for bad in ("pre train", "x" * 33, 3, ""):
        assert loss_phase("eval", {"phase": bad}) == "eval"
