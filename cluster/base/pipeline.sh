#!/usr/bin/env bash
# The EmbSum training pipeline, as the RayJob embsum-pipeline runs it on the Ray head:
#
#   spec.entrypoint: bash /etc/embsum/pipeline.sh     (this file, from ConfigMap embsum-pipeline)
#
# Why a script and not an inline entrypoint: in K8sJobMode KubeRay pastes spec.entrypoint into
# the submitter pod's `bash -c "... ray job submit ... -- <entrypoint> ; fi"`, so a `$VAR`, `;`
# or `&&` written there would be expanded or run in the submitter pod, not on the cluster. A
# plain command that runs a script keeps all shell logic on the head, where the settings
# (ConfigMap embsum-settings, set per overlay) are in the environment.
#
# It is `embsum run --no-serve`: the stages of embsum/pipeline.py's one ordered list (prepare ->
# summarize -> train -> evaluate -> embed -> promote), each its own driver process on the head
# (`--address auto` joins the running cluster). Every stage after train acts on the version train
# registered, by number; the gate promotes it only when its embeddings exist and it beats the
# champion. A failing stage (or a registry error at the gate) fails the RayJob with the alias
# unchanged. Serving it is a separate, reviewed step: the RayService rollout (cluster/README.md,
# "Model rollouts"), which the run's report names. Stages hand data over through WORKDIR (the
# shared PVC) and MLflow.
set -euo pipefail

: "${EMBSUM_STORAGE_URI:?set EMBSUM_STORAGE_URI (s3://BUCKET or a path on the shared PVC) in the overlay}"
: "${EMBSUM_WORKDIR:?set EMBSUM_WORKDIR (a path on the shared PVC) in the overlay}"
: "${EMBSUM_MLFLOW_URI:?set EMBSUM_MLFLOW_URI in the overlay}"

CONFIG=/app/ray_config.yaml

# A RayJob's log (`kubectl logs`, `ray job logs`) is where an operator reads it: every stage's full
# output there (EMBSUM_VERBOSE=1), not only the progress and summary lines `embsum` shows by
# default. Each stage's output is also kept in ${EMBSUM_WORKDIR}/logs/<stage>.log on the shared PVC.
# EMBSUM_VERBOSE=0 in the overlay's embsum-settings gives the quiet console.
export EMBSUM_VERBOSE="${EMBSUM_VERBOSE:-1}"

# Free-form extra overrides from the overlay, split on whitespace; read -a does not glob, so a
# value like data.interactions=s3://b/logs/*.parquet reaches embsum as written.
read -r -a EXTRA <<< "${EMBSUM_EXTRA_OVERRIDES:-}"

OVERRIDES=(
  # data/, embeddings/ and the teacher cache on the shared PVC: every node reads what prepare wrote.
  "workdir=${EMBSUM_WORKDIR}"
  # Checkpoints on shared storage (never a pod's disk): a resumed or multi-node run finds them.
  "train.storage_path=${EMBSUM_STORAGE_URI%/}/checkpoints"
  "train.use_gpu=${EMBSUM_USE_GPU:-false}"
  "train.num_workers=${EMBSUM_TRAIN_WORKERS:-2}"
  # Batch inference (evaluate, embed): model replicas and CPUs each (ray_config.yaml has 1 for the demo).
  "infer.actors=${EMBSUM_INFER_ACTORS:-4}"
  "infer.cpus=${EMBSUM_INFER_CPUS:-1}"
  # '' = a fresh timestamped run; a fixed name makes a rerun resume from its latest checkpoint.
  "train.run_name=${EMBSUM_RUN_NAME:-}"
  "mlflow.tracking_uri=${EMBSUM_MLFLOW_URI}"
  # Artifacts go through the tracking server (--serve-artifacts) to its S3 destination; the
  # default (a local WORKDIR folder) would leave them on one pod.
  "mlflow.artifact_location=mlflow-artifacts:/embsum"
  "${EXTRA[@]}"
)

echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) embsum run --no-serve"
embsum run --config "${CONFIG}" --address auto --no-serve "${OVERRIDES[@]}"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) finished"
