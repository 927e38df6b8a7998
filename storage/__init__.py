"""slimflow's storage layer: run-directory layout, Parquet shards, manifests, hashing, input readers.

Nothing here imports Prefect or torch: this is the ground truth of what a run has done, readable by any
process that can read files.
"""
