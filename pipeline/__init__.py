"""Ray Data stages of the memorize job (and, elsewhere in this package, the Ray Serve application).

Each stage is a callable class over :mod:`memorag_core` with a typed config (:mod:`pipeline.config`):

=====================  ======================================================================================
module                 stage
=====================  ======================================================================================
``read``               corpus files (JSONL, Parquet, .txt folder; local or s3://) -> raw document rows
``validate``           decode and check; bad rows -> quarantine with a reason
``pack``               tokenize, split long documents, content-defined packing into units
``memory_stage``       memory actors: memorize units, write memories through the store (resumable)
``chunk_embed``        chunk each unit's documents and embed them (staged per unit, resumable)
``index``              FAISS: train once, fill shards in parallel, merge
``router``             index over per-unit gists
``publish``            manifest, job statistics, publish a new collection version
=====================  ======================================================================================

``jobs.memorize`` wires them into the job. Importing this package does not import Ray.
"""
