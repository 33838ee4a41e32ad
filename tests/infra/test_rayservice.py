"""The KubeRay RayService manifest and the example Serve config file parse, validate against Ray Serve's own
schema and against the app's typed config, and fit the GPUs they ask for."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _check_serve_config(doc: dict):
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve.config import ServeAppConfig

    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(doc)
    (app,) = doc["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("pipeline.serve.app", "build_app")
    assert callable(getattr(importlib.import_module(module), attr))
    return ServeAppConfig.model_validate(app["args"])


def test_rayservice_manifest_is_a_valid_serve_config_that_fits_its_gpus():
    doc = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    cfg = _check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert cfg.auth and cfg.store.startswith("s3://") and cfg.generator.spec.startswith("vllm:")
    cluster = doc["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"]
    gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g["replicas"] for g in workers)
    wanted = 0.0
    for stage in (cfg.memory, cfg.retriever, cfg.generator):
        d = stage.deployment
        wanted += d.num_gpus * (d.autoscaling.min_replicas if d.autoscaling else d.num_replicas)
    assert wanted <= gpus, (wanted, gpus)
    images = {c["image"] for g in workers for c in g["template"]["spec"]["containers"]}
    images |= {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_example_serve_config_file_validates():
    cfg = _check_serve_config(yaml.safe_load((ROOT / "pipeline" / "serve" / "serve_config.yaml").read_text()))
    assert cfg.host == "127.0.0.1" and cfg.memory.deployment.autoscaling is not None
    opts = cfg.memory.deployment.serve_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 2


def test_no_auth_only_on_loopback_and_unknown_keys_are_refused():
    from pydantic import ValidationError

    from pipeline.serve.config import ServeAppConfig

    assert not ServeAppConfig(store="s", auth=False, host="127.0.0.1").auth
    assert not ServeAppConfig(store="s", auth=False, host="::1").auth
    with pytest.raises(ValidationError, match="loopback"):
        ServeAppConfig(store="s", auth=False, host="0.0.0.0")
    with pytest.raises(ValidationError, match="max_in_fligth"):
        ServeAppConfig.model_validate({"store": "s", "limits": {"max_in_fligth": 3}})
