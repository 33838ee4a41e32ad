"""The container image and the KubeRay RayJob manifest parse and name what the job needs."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs.options import MemorizeJobFlags, parse_flags

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_rayjob_manifest_names_gpu_workers_and_a_valid_entrypoint():
    doc = yaml.safe_load((INFRA / "kuberay" / "rayjob-memorize.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.memorize"]
    args = parse_flags(MemorizeJobFlags, argv[3:])  # the entrypoint's flags are ones the job accepts
    assert args.corpus.startswith("s3://") and args.store.startswith("s3://") and args.actor_gpus == 1
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    workers = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in workers
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups and gpu_groups[0]["rayStartParams"]["num-gpus"] == "1"
    assert args.actors <= sum(g["maxReplicas"] for g in gpu_groups)
    images = {c["image"] for g in workers for c in g["template"]["spec"]["containers"]}
    images |= {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_dockerfile_installs_the_project_and_its_entry():
    lines = [ln.strip() for ln in (INFRA / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0].startswith("FROM rayproject/ray:2.60")
    text = "\n".join(lines)
    for needed in ("requirements/lock.txt", "COPY --chown=ray:users pipeline pipeline", "jobs.memorize",
                   "pip install --no-cache-dir --no-deps -e ."):
        assert needed in text
    copied = [ln.split()[-2] for ln in lines if ln.startswith("COPY") and not ln.endswith("./")]
    root = INFRA.parent
    assert all((root / p).exists() for p in copied), copied
