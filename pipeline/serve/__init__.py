"""The Ray Serve application of memorag: FastAPI ingress (native and OpenAI-compatible APIs), memory worker,
retriever and generator deployments, and the typed config file. See docs/serve.md.

Importing this package imports Ray Serve; :mod:`pipeline.serve.config` alone does not.
"""
