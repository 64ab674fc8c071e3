"""Bulk runs: caption every image under an S3 prefix or in a manifest, resumably, into S3.

Planning (``caption-worker bulk submit``): list the source as a stream, give each item its
identity, skip what earlier runs already captioned, and write the run's ``inputs/`` shards
and ``run.json``. Modules, smallest first: ``errors`` (typed failures), ``layout`` (every S3
key name of a run), ``identity`` (config hash), ``sources`` (prefix listings and manifests
as item streams), ``skips`` (the on-disk index of earlier outputs), ``plan`` (sharding and
writing).

Execution (the ``caption_bulk_shard`` task in ``worker.queue.bulk_task``): ``runfiles`` (a
run's files in S3), ``state`` (its record in Redis: counters, done shards, the window),
``shard`` (one shard through the caption service), ``status`` (``bulk status`` and
``manifest.json``). docs/bulk.md is the design.
"""
