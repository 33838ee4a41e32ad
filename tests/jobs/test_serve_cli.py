"""`memorag serve` config assembly (config file + flags) and its refusals; no Ray is started here."""

from __future__ import annotations

from pathlib import Path

from jobs.cli import main
from jobs.serve import app_config

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "serve" / "serve_config.yaml"


def test_flags_override_the_config_file(tmp_path):
    cfg = app_config(str(tmp_path), config_file=str(EXAMPLE), no_auth=True,
                     overrides={"limits": {"max_in_flight": 3}})
    assert cfg.store == str(tmp_path) and not cfg.auth and cfg.host == "127.0.0.1"
    assert cfg.limits.max_in_flight == 3 and cfg.limits.max_top_k == 20  # the file's other limits stay
    assert cfg.memory.deployment.autoscaling.max_replicas == 2


def test_no_auth_off_loopback_is_refused(tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path), "--host", "0.0.0.0", "--no-auth"]) == 2
    assert "loopback" in capsys.readouterr().err
