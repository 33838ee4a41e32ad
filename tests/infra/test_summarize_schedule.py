"""The scheduled summarization: the CronJob -> RayJob manifest, the RayCronJob manifest and the documented crontab
line parse, schedule sensibly, and run a `jobs.summarize` command line that the job accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from jobs.options import SummarizeJobFlags, parse_flags

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "infra" / "kuberay"

_CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def check_cron(expr: str) -> None:
    fields = expr.split()
    assert len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields), expr
    minute, hour = fields[0], fields[1]
    assert minute == "*" or 0 <= int(minute.split("/")[0].split("-")[0].split(",")[0]) <= 59
    assert hour == "*" or 0 <= int(hour.split("/")[0].split("-")[0].split(",")[0]) <= 23


def check_summarize_entrypoint(entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.summarize"]
    cfg = parse_flags(SummarizeJobFlags, argv[3:]).to_config()  # flags the job accepts, a valid config
    assert cfg.collection and cfg.store.startswith("s3://")
    return cfg


def check_rayjob_spec(spec: dict) -> None:
    cfg = check_summarize_entrypoint(spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups and gpu_groups[0]["rayStartParams"]["num-gpus"] == "1"
    assert cfg.num_gpus == 1 and cfg.concurrency <= sum(g["maxReplicas"] for g in gpu_groups)


def test_cronjob_creates_a_rayjob_that_runs_the_summarize_job():
    docs = [d for d in yaml.safe_load_all((KUBERAY / "cronjob-summarize.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cron = by_kind["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    check_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = by_kind["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    assert by_kind["RoleBinding"]["subjects"][0]["name"] == sa
    assert by_kind["RoleBinding"]["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    rule = by_kind["Role"]["rules"][0]
    assert "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]
    path = container["command"][3]
    assert path.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = by_kind["ConfigMap"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    rayjob = yaml.safe_load(cm["data"][path.rsplit("/", 1)[1]])
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["generateName"].endswith("-")  # `kubectl create` names each run anew
    check_rayjob_spec(rayjob["spec"])


def test_raycronjob_schedules_the_same_rayjob():
    doc = yaml.safe_load((KUBERAY / "raycronjob-summarize.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    check_cron(doc["spec"]["schedule"])
    check_rayjob_spec(doc["spec"]["jobTemplate"])
    cron = next(d for d in yaml.safe_load_all((KUBERAY / "cronjob-summarize.yaml").read_text())
                if d and d["kind"] == "ConfigMap")
    rayjob = yaml.safe_load(next(iter(cron["data"].values())))
    assert doc["spec"]["jobTemplate"]["entrypoint"] == rayjob["spec"]["entrypoint"]


def test_documented_crontab_line_submits_the_job():
    text = (ROOT / "docs" / "summarize.md").read_text()
    block = text.split("<!-- crontab -->", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines()[1:] if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    line = lines[0]
    fields = line.split(None, 5)
    check_cron(" ".join(fields[:5]))
    argv = shlex.split(fields[5].split(">>")[0])
    ray = argv.index("ray")
    assert argv[ray:ray + 3] == ["ray", "job", "submit"] and "--address" in argv
    rest = argv[argv.index("--") + 1:]
    assert rest[:3] == ["python", "-m", "jobs.summarize"]
    parse_flags(SummarizeJobFlags, rest[3:])
    assert "%" not in line.replace("\\%", "")  # cron treats a bare % as a newline
