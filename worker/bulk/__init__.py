"""Bulk runs: caption every image under an S3 prefix or in a manifest, resumably, into S3.

This package holds the planning half (``caption-worker bulk submit``): list the source as a
stream, give each item its identity, skip what earlier runs already captioned, and write the
run's ``inputs/`` shards and ``run.json``. Modules, smallest first: ``errors`` (typed
failures), ``layout`` (every S3 key name of a run), ``identity`` (config hash), ``sources``
(prefix listings and manifests as item streams), ``skips`` (the on-disk index of earlier
outputs), ``plan`` (sharding and writing). docs/bulk.md is the design.
"""
