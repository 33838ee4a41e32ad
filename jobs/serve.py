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
import time
from collections.abc import Callable
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


def start_serve(cfg, *, port: int = 8000, ray_address: str | None = None, num_cpus: int | None = None,
                progress: Callable[[str], None] | None = None, wait_s: float | None = None) -> str:
    """Start Ray (local unless ``ray_address``/``RAY_ADDRESS``) and Serve, deploy the app; returns its URL once
    every deployment is running.

    The config is fitted to the cluster first (:func:`~pipeline.serve.config.fit_to_cpus`): CPU sizes left at
    their defaults shrink to fit; explicit sizes that a local node cannot hold are refused (InvalidInputError
    naming the shortfall and the settings), and on a joined cluster (which may autoscale) only warned about.
    While the deployments start, ``progress`` (default: the log) hears every ``report_every_s`` which ones are
    not running yet and why (Serve's own message: "waiting for resources", a failing constructor, ...).

    Raises:
        InvalidInputError: the config does not fit a local node.
        RuntimeError: the application failed to deploy (Serve's message), or ``wait_s`` passed first.
    """
    import ray
    from ray import serve

    from pipeline.serve.app import build_app
    from pipeline.serve.config import fit_to_cpus

    say = progress or logger.warning
    joined = bool(ray_address or os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
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
            from pipeline.ray_env import local_worker_priority

            local_worker_priority()
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    cfg, note = fit_to_cpus(cfg, cpus, refuse=not joined)
    if note:
        say(note)
    serve.start(http_options={"host": cfg.host, "port": port})
    deploy_app(build_app(cfg), say, wait_s=wait_s)
    return f"http://{cfg.host}:{port}"


def deploy_app(app, say: Callable[[str], None], *, name: str = APP_NAME, wait_s: float | None = None,
               report_every_s: float = 15.0) -> None:
    """Deploy ``app`` and wait until it runs, telling ``say`` which deployments are not running while it waits.

    Raises RuntimeError when Serve reports the application failed (with its message) or ``wait_s`` passed.
    """
    from ray import serve

    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    deployer = threading.Thread(target=run, daemon=True, name="serve-deploy")
    t0 = time.monotonic()
    deployer.start()
    last = t0
    while deployer.is_alive():
        deployer.join(1.0)
        now = time.monotonic()
        if wait_s is not None and now - t0 > wait_s:
            raise RuntimeError(f"the application is not running after {wait_s:g} s: "
                               + ("; ".join(waiting_for(name)) or "no status"))
        if deployer.is_alive() and now - last >= report_every_s:
            last = now
            for line in waiting_for(name):
                say(f"waiting ({now - t0:.0f} s): {line}")
    if errors:
        raise RuntimeError(f"the application failed to start: {errors[0]}") from errors[0]


def waiting_for(name: str = APP_NAME) -> list[str]:
    """One line per deployment of application ``name`` that is not running yet: its status and Serve's
    message (e.g. the resources a replica waits for)."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception as exc:  # noqa: BLE001 - the controller is still starting
        return [f"Serve is starting ({type(exc).__name__})"]
    if app is None:
        return ["the application is being deployed"]
    out = []
    for dep, st in app.deployments.items():
        if str(st.status.value if hasattr(st.status, "value") else st.status) != "HEALTHY":
            out.append(f"{dep} is {getattr(st.status, 'value', st.status)}"
                       + (f": {st.message}" if st.message else ""))
    return out or [f"application {getattr(app.status, 'value', app.status)}" + (f": {app.message}"
                                                                                if app.message else "")]


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
