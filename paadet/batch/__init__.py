"""Detection over many images on a Ray cluster: sharded, resumable output that holds every input once.

How it works (see ``docs/batch.md``):

* Before any work, the driver (the process that calls :func:`run_batch`) checks the settings and the
  output paths, and hashes the weights file (:mod:`.weights`); the model is a
  :class:`~paadet.runtime.spec.DetectorSpec`, handed to each worker as it is.
* It lists the inputs (:mod:`.inputs`), drops those that an earlier run with the same output folder
  already covers (:mod:`.output`; the folder must come from the same settings and weights), starts or
  joins Ray, checks that the cluster can hold a worker at all, and starts a pool of Ray actors
  (:mod:`.cluster`), each holding one :class:`~paadet.detector.Detector` (:mod:`.worker`; one GPU per
  actor where asked for, else CPUs), giving up on workers Ray cannot place within a deadline.
* It cuts the inputs into shards and hands them out (:mod:`.run`); each actor decodes and resizes
  its images in a thread pool ahead of the network and sends the detections of the whole shard back
  (:mod:`.shards` keeps the queue and the counts).
* Only the driver writes. For each finished shard it writes the results file
  (``shards/shard-NNNNNN.jsonl``, one JSON object per detected image) atomically, then the shard's
  manifest (``shards/shard-NNNNNN.manifest.json``: the inputs it covers, its unreadable images, the
  results file's size and SHA-256) atomically. The manifest is the commit: a shard without one does
  not exist, and its inputs are done again by the next run.
* A task whose actor dies (killed process, lost node, out of memory) fails with a Ray error; the
  driver puts the shard back in the queue (Ray restarts the actor), so a dead worker costs one shard;
  a shard that fails again is split, down to single images, so one bad image costs its neighbours
  only retries. Because one process commits each shard once, under a fresh number, no input is ever
  written twice.

Ray is an optional dependency (``pip install "paadet[ray]"``); it is imported only when a run starts.
"""

from __future__ import annotations

from paadet.batch.cluster import DEFAULT_START_TIMEOUT, cluster_capacity, node_capacity, require_ray, start_workers
from paadet.batch.errors import BatchError
from paadet.batch.inputs import LIST_SUFFIXES, expand_inputs, input_key, list_entry, read_path_list
from paadet.batch.output import (
    ERRORS_FILE,
    FORMAT,
    LOCK_FILE,
    RUN_FILE,
    SHARD_FORMAT,
    SHARDS_DIR,
    SUMMARY_FILE,
    OutputFolder,
    ShardManifest,
    merge_coco,
    read_results,
    record_to_result,
    result_record,
    shard_stem,
)
from paadet.batch.run import check_outputs, check_settings, run_batch
from paadet.batch.shards import BatchSummary, Failure, ShardDone, ShardQueue, WorkerStats, default_shard_size
from paadet.batch.weights import weights_identity
from paadet.batch.worker import ShardWorker
from paadet.runtime.spec import DetectorSpec

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "ERRORS_FILE",
    "FORMAT",
    "LIST_SUFFIXES",
    "LOCK_FILE",
    "RUN_FILE",
    "SHARDS_DIR",
    "SHARD_FORMAT",
    "SUMMARY_FILE",
    "BatchError",
    "BatchSummary",
    "DetectorSpec",
    "Failure",
    "OutputFolder",
    "ShardDone",
    "ShardManifest",
    "ShardQueue",
    "ShardWorker",
    "WorkerStats",
    "check_outputs",
    "check_settings",
    "cluster_capacity",
    "default_shard_size",
    "expand_inputs",
    "input_key",
    "list_entry",
    "merge_coco",
    "node_capacity",
    "read_path_list",
    "read_results",
    "record_to_result",
    "require_ray",
    "result_record",
    "run_batch",
    "shard_stem",
    "start_workers",
    "weights_identity",
]
