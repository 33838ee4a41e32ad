"""``memorag serve``: start a local Ray (or join ``RAY_ADDRESS``), start Serve on HOST:PORT, run the memorag
application over a store, print the URL and block until interrupted.

The config file is a Serve config file (see ``pipeline/serve/serve_config.yaml``); its memorag application's
``args`` are the base, and ``--store``, ``--host``, ``--no-auth`` override them. (``serve run FILE`` on a running
Ray reads the same file, including Serve's own per-deployment overrides.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

APP_NAME = "memorag"


def app_config(store: str, *, host: str = "127.0.0.1", config_file: str | None = None, no_auth: bool = False,
               storage_options: dict | None = None, overrides: dict[str, Any] | None = None):
    """The :class:`~pipeline.serve.config.ServeAppConfig` from a config file (optional) and the flags."""
    from pipeline.serve.config import ServeAppConfig, load_serve_config_file

    args: dict[str, Any] = load_serve_config_file(config_file)[1] if config_file else {}
    args.update(store=store, host=host)
    if storage_options is not None:
        args["storage_options"] = storage_options
    if no_auth:
        args["auth"] = False
    for k, v in (overrides or {}).items():
        args[k] = {**args.get(k, {}), **v} if isinstance(v, dict) and isinstance(args.get(k), dict) else v
    return ServeAppConfig.model_validate(args)


def start_serve(cfg, *, port: int = 8000, ray_address: str | None = None, num_cpus: int | None = None) -> str:
    """Start Ray (local unless ``ray_address``/``RAY_ADDRESS``) and Serve, deploy the app; returns its URL."""
    import ray
    from ray import serve

    from pipeline.serve.app import build_app

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                          "MEMORAG_CACHE", "MEMORAG_S3_ENDPOINT", "AWS_ENDPOINT_URL",
                                          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{port}"


def serve_forever(url: str) -> None:
    """Block until SIGINT/SIGTERM, then shut Serve and Ray down."""
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("serving at %s", url)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
