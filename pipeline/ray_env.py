"""Join or start Ray for a job: the same runtime environment for the memorize and summarize jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
"""The checkout that holds ``pipeline`` and ``memorag_core``: put on the workers' ``PYTHONPATH``."""


def local_worker_priority() -> None:
    """Before starting a local Ray: its workers run at this process's priority (``RAY_worker_niceness=0`` unless
    the caller set it). Ray starts workers at nice 15 to keep a cluster node's raylet responsive; on a shared
    machine that starved the memorize job's only actor behind any normal-priority process (the demo's memorize
    took 788 s instead of about a minute beside two evaluations, docs/memorize_job.md). A cluster we join keeps its
    own setting."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` / ``$RAY_ADDRESS``, or start a local one with ``num_cpus`` CPUs (None =
    all); nothing happens when Ray is already initialized. Workers get this checkout on ``PYTHONPATH`` and the
    offline / cache variables of this process (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``MEMORAG_CACHE``,
    ``TOKENIZERS_PARALLELISM``). Under ``ray job submit`` the submitter's runtime env wins for the keys it sets
    (``ray.init`` refuses to set them twice)."""
    import ray

    if ray.is_initialized():
        return
    paths = [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEMORAG_CACHE", "TOKENIZERS_PARALLELISM"):
        if k in os.environ:
            env[k] = os.environ[k]
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"num_cpus": num_cpus}
    if not address:
        local_worker_priority()
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, **kwargs)
