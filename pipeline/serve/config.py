"""The Serve application's typed config: the ``args`` of ``pipeline.serve.app:build_app`` in a Serve config file.

One file sets everything: the store, auth, request limits, and for each deployment (ingress, memory worker,
retriever, generator) its replicas or autoscaling, CPUs/GPUs and concurrency. ``serve run FILE`` (Ray's CLI),
``memorag serve --config FILE`` and a KubeRay ``RayService`` (``serveConfigV2``) read the same file; see
``pipeline/serve/serve_config.yaml`` for a commented example. Ray Serve validates the ``args`` mapping into
:class:`ServeAppConfig` (a typed application builder), so a wrong key or type fails at deploy time, naming it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from memorag_core.query.types import QueryLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingOptions(_Strict):
    """Serve autoscaling of one deployment (replaces ``num_replicas``)."""

    min_replicas: int = Field(1, ge=0, description="fewest replicas (0 allows scale to zero)")
    max_replicas: int = Field(4, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(10.0, ge=0, description="seconds of overload before adding replicas")
    downscale_delay_s: float = Field(120.0, ge=0, description="seconds of underload before removing replicas")


class DeploymentOptions(_Strict):
    """Replicas and resources of one deployment (passed to ``Deployment.options``)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: AutoscalingOptions | None = Field(None, description="autoscaling instead of a fixed count")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (fractions allowed)")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica runs at once (Serve's limit)")
    max_queued_requests: int = Field(-1, ge=-1, description="requests queued per caller beyond that (-1: no "
                                                            "bound); over it Serve answers 503")
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between replica health checks")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="seconds a stopping replica may finish "
                                                                       "its requests")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of the replica processes")

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.env_vars:
            opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(self.env_vars)}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class LimitsConfig(_Strict):
    """Request bounds, checked at the ingress before any work."""

    max_query_chars: int = Field(4000, ge=1, description="longest question, in characters")
    max_new_tokens: int = Field(1024, ge=1, description="most answer tokens a request may ask for")
    max_clue_tokens: int = Field(256, ge=1, description="most tokens per clue generation")
    max_units: int = Field(16, ge=1, description="most unit memories one request may consult")
    max_top_k: int = Field(50, ge=1, description="most evidence passages one request may receive")
    max_body_bytes: int = Field(64 * 1024, ge=256, description="largest request body, in bytes (413 beyond)")
    max_in_flight: int = Field(32, ge=1, description="requests an ingress replica works on at once (429 beyond)")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of a 429 or 503, in seconds")
    deadline_s: float = Field(300.0, ge=0, description="seconds a /v1/ request may take (504 beyond; its work "
                                                       "is cancelled); 0: no deadline")
    key_rate_per_s: float = Field(10.0, ge=0, description="requests per second one API key may send (token "
                                                          "bucket per key and ingress replica; 0: no limit); "
                                                          "beyond: 429 with Retry-After")
    key_burst: int = Field(20, ge=1, description="requests one API key may send at once (the bucket's size)")

    def query_limits(self) -> QueryLimits:
        return QueryLimits(self.max_query_chars, self.max_new_tokens, self.max_clue_tokens, self.max_units,
                           self.max_top_k)


class IngressConfig(_Strict):
    """The HTTP ingress (FastAPI)."""

    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.25, max_ongoing_requests=64),
        description="replicas and resources; max_ongoing_requests must exceed limits.max_in_flight so that the "
                    "ingress itself answers 429")
    key_cache_s: float = Field(5.0, ge=0, description="seconds an API-key verdict is cached (revocation delay)")
    key_index_refresh_s: float = Field(2.0, ge=0, description="the index of key ids is re-listed at most this "
                                                              "often; a key created since is accepted after it")
    list_cache_s: float = Field(5.0, ge=0, description="seconds the collection list (/v1/collections, "
                                                       "/v1/models) is cached")


class MemoryWorkerConfig(_Strict):
    """The memory worker: unit memories (cached) and clue decoding, batched across concurrent requests."""

    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=1.0,
                                                                                    max_ongoing_requests=16))
    cache_bytes: int = Field(2 << 30, ge=0, description="bytes of unit memories kept loaded per replica (LRU)")
    device: str | None = Field(None, description="where the memory model runs (cpu, cuda); None: the "
                                                 "collection's own setting")
    max_batch_size: int = Field(8, ge=1, description="clue requests decoded together (Serve batching)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="seconds a batch waits to fill")
    warm_s: float = Field(120.0, ge=0, description="at start, seconds a replica may spend loading the live "
                                                   "versions' memory model and unit memories (within cache_bytes) "
                                                   "before it reports ready; 0: load on first use")


class RetrieverConfig(_Strict):
    """The retriever: the collection's embedder and its sharded index (routing and evidence)."""

    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.5,
                                                                                    max_ongoing_requests=16))
    device: str = Field("auto", description="embedder device (auto, cpu, cuda)")
    plan: dict[str, Any] = Field(default_factory=dict, description="retrieval plan settings "
                                 "(memorag_core.retrieval.queries.PlanConfig fields: sources, depth, ground_spans, "
                                 "fusion: {rrf_k, weights, question_floor, ...}); the same fields as the CLI's "
                                 "--plan file and the evaluation's plan; empty: the library defaults")

    @field_validator("plan")
    @classmethod
    def _plan_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        from memorag_core.retrieval.queries import PlanConfig

        try:
            PlanConfig.from_dict(v)
        except Exception as exc:  # noqa: BLE001 - reported as a validation error naming the field
            raise ValueError(str(exc)) from None
        return v

    def plan_config(self):
        """The :class:`~memorag_core.retrieval.queries.PlanConfig` these settings describe."""
        from memorag_core.retrieval.queries import PlanConfig

        return PlanConfig.from_dict(self.plan)
    warm: bool = Field(True, description="at start, load the live versions (indexes, embedder) before reporting "
                                         "ready")


class GeneratorConfig(_Strict):
    """The generator that writes answers from evidence."""

    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=1.0,
                                                                                    max_ongoing_requests=16))
    spec: str = Field("hf:", description="generator: 'vllm:<model>' (vLLM engine; 'vllm:' = embedded SmolLM2), "
                                         "'hf:<model>' (transformers; 'hf:' = embedded), "
                                         "'openai:<model>@<base_url>' (an OpenAI-compatible server)")
    device: str | None = Field(None, description="transformers backend device (cpu, cuda); None: auto")
    max_model_len: int | None = Field(None, ge=16, description="vLLM context length (None: the model's own)")
    dtype: str = Field("auto", description="weights dtype (auto, float32, bfloat16, float16)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra backend arguments: vllm.LLM "
                                          "engine arguments (enforce_eager, tensor_parallel_size, ...) or the "
                                          "transformers/OpenAI backend's own (batch_size, api_key, ...)")
    max_batch_size: int = Field(8, ge=1, description="non-streamed answers generated together (Serve batching)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="seconds a batch waits to fill")
    warm: bool = Field(True, description="at start, generate one token before reporting ready (a backend's first "
                                         "call is several times slower than the next ones)")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SessionsConfig(_Strict):
    """Conversation sessions and user memories (see memorag_core/query/sessions.py)."""

    ttl_s: float = Field(24 * 3600.0, gt=0, description="a session expires this long after its last turn (s)")
    max_turns: int = Field(8, ge=1, description="turns a session memory keeps; older ones are folded away")
    max_bytes: int = Field(64 << 20, ge=1, description="K/V bytes a session memory may hold")
    user_every: int = Field(4, ge=1, description="a user memory grows every this many session turns (and when "
                                                 "a session ends)")
    max_history_messages: int = Field(64, ge=1, description="most messages of a chat history (413 beyond)")
    max_history_chars: int = Field(32_000, ge=1, description="most characters of a chat history (413 beyond)")
    standalone_tokens: int = Field(40, ge=1, description="most tokens of the standalone question")
    recall_tokens: int = Field(48, ge=1, description="most tokens of the session / user recalls")
    user_ttl_s: float = Field(365 * 24 * 3600.0, gt=0, description="a user memory untouched this long is deleted "
                                                                   "by the sweeper (s)")
    max_sessions_per_owner: int = Field(1000, ge=1, description="live sessions one tenant may hold (429 beyond)")
    max_bytes_per_owner: int = Field(4 << 30, ge=1, description="bytes of session and user memories one tenant "
                                                               "may store (429 for a new session beyond)")
    sweep_every_s: float = Field(60.0, gt=0, description="the sweeper ends expired sessions and deletes expired "
                                                         "user memories this often (a thread per memory worker)")

    def session_config(self):
        from memorag_core.query.sessions import SessionConfig

        return SessionConfig(ttl_s=self.ttl_s, max_turns=self.max_turns, max_bytes=self.max_bytes,
                             user_every=self.user_every, max_history_messages=self.max_history_messages,
                             max_history_chars=self.max_history_chars, standalone_tokens=self.standalone_tokens,
                             recall_tokens=self.recall_tokens, user_ttl_s=self.user_ttl_s,
                             max_sessions_per_owner=self.max_sessions_per_owner,
                             max_bytes_per_owner=self.max_bytes_per_owner, sweep_every_s=self.sweep_every_s)


class ServeAppConfig(_Strict):
    """Everything the memorag Serve application needs (the ``args`` of ``pipeline.serve.app:build_app``)."""

    store: str = Field(..., description="store root: a local folder or s3://bucket/prefix")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options of the store (S3 endpoint, "
                                                                     "credentials); None: the environment's")
    auth: bool = Field(True, description="require an API key per collection (Authorization: Bearer <key>)")
    host: str = Field("127.0.0.1", description="the address HTTP is served on; auth=false is refused unless it "
                                               "is a loopback address")
    refresh_s: float = Field(5.0, ge=0, description="the live pointer of a collection is re-read at most this "
                                                    "often (seconds)")
    lease_ttl_s: float = Field(600.0, gt=0, description="lifetime of the leases that keep held versions from gc; "
                                                        "renewed every refresh_s")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    memory: MemoryWorkerConfig = Field(default_factory=MemoryWorkerConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    default_task: Literal["memorag", "qa", "summarize"] = Field(
        "memorag", description="task of OpenAI-compatible chat requests that do not name one")

    @model_validator(mode="after")
    def _check(self) -> "ServeAppConfig":
        if not self.auth and not is_loopback(self.host):
            raise ValueError(f"auth=false is only allowed on a loopback host, not {self.host!r}")
        if self.lease_ttl_s <= self.refresh_s:
            raise ValueError("lease_ttl_s must exceed refresh_s (leases are renewed every refresh_s)")
        return self


DEPLOYMENTS = ("ingress", "memory", "retriever", "generator")


def _replicas(d: DeploymentOptions) -> int:
    return d.autoscaling.min_replicas if d.autoscaling is not None else d.num_replicas


def cpu_demand(cfg: ServeAppConfig) -> dict[str, float]:
    """CPUs each deployment reserves at start (``num_cpus`` x replicas, autoscaling: x ``min_replicas``)."""
    return {n: getattr(cfg, n).deployment.num_cpus * _replicas(getattr(cfg, n).deployment) for n in DEPLOYMENTS}


def cpus_set_by_user(cfg: ServeAppConfig, name: str) -> bool:
    """True when the config (file or flags) names ``<name>.deployment.num_cpus`` itself (not a default)."""
    section = getattr(cfg, name)
    return ("deployment" in section.model_fields_set and "num_cpus" in section.deployment.model_fields_set
            and name in cfg.model_fields_set)


def fit_to_cpus(cfg: ServeAppConfig, cpus: float, *, refuse: bool = True) -> tuple[ServeAppConfig, str | None]:
    """The config with default CPU sizes scaled down so that every deployment fits ``cpus``.

    Deployments whose ``num_cpus`` the config leaves at its default share what the explicitly sized ones leave,
    in proportion to their defaults (a 2-CPU node: ingress 0.18, memory 0.73, retriever 0.36, generator 0.73).
    Returns ``(config, note)``: ``note`` says what was changed (None when nothing was).

    Raises:
        InvalidInputError: (``refuse``) the explicitly sized deployments alone ask for more than ``cpus``, or
            leave less than 0.05 CPU per replica to the others; the message names the shortfall and the settings.
    """
    from memorag_core.errors import InvalidInputError

    demand = cpu_demand(cfg)
    total = sum(demand.values())
    if total <= cpus + 1e-9:
        return cfg, None
    shown = ", ".join(f"{n} {v:g}" for n, v in demand.items())
    fixed = {n: v for n, v in demand.items() if cpus_set_by_user(cfg, n)}
    free = {n: v for n, v in demand.items() if n not in fixed and v > 0}
    room = cpus - sum(fixed.values())
    factor = room / sum(free.values()) if free else 0.0
    too_small = not free or any(getattr(cfg, n).deployment.num_cpus * factor < 0.05 for n in free)
    if room <= 0 or too_small:
        msg = (f"the deployments ask for {total:g} CPUs ({shown}) but the Ray cluster has {cpus:g}: "
               f"{total - cpus:g} short. Lower " + ", ".join(f"{n}.deployment.num_cpus" for n in (fixed or demand))
               + " in the config file (--config), or start on a larger node / join a cluster (--ray-address)")
        if refuse:
            raise InvalidInputError(msg)
        return cfg, msg
    update = {}
    for n in free:
        section = getattr(cfg, n)
        dep = section.deployment.model_copy(update={"num_cpus": round(section.deployment.num_cpus * factor - 5e-3, 2)})
        update[n] = section.model_copy(update={"deployment": dep})
    fitted = cfg.model_copy(update=update)
    note = (f"default CPU sizes ({shown}: {total:g}) scaled by {factor:.2f} to fit the cluster's {cpus:g} CPUs: "
            + ", ".join(f"{n} {v:g}" for n, v in cpu_demand(fitted).items()))
    return fitted, note


def load_serve_config_file(path: str) -> tuple[dict, dict]:
    """Read a Serve config file (YAML); returns (the whole document, the memorag application's ``args``).

    The memorag application is the one whose ``import_path`` is ``pipeline.serve.app:build_app`` (or the only
    one). Raises InvalidInputError when the file names none.
    """
    import yaml

    from memorag_core.errors import InvalidInputError

    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    apps = doc.get("applications") or []
    ours = [a for a in apps if str(a.get("import_path", "")).startswith("pipeline.serve.app:")] or apps[:1]
    if not ours:
        raise InvalidInputError(f"{path} lists no application (expected applications: - import_path: "
                                "pipeline.serve.app:build_app)")
    return doc, dict(ours[0].get("args") or {})
