#!/usr/bin/env bash
# Train UniMedVL on a Cloud TPU VM pod slice (multi-host). Every worker runs the SAME command;
# unimedvl_jax.sharding.maybe_initialize_distributed() calls jax.distributed.initialize() (TPU
# auto-detection from the VM metadata), each host reads its own 1/N of the data, and all hosts
# write their shards of every checkpoint through Orbax into the shared WORKDIR.
#
#   bash launch/tpu_pod.sh create     # on-demand / spot TPU VM slice   (or: queued)
#   bash launch/tpu_pod.sh queued     # queued resource (waits for capacity; SPOT=1 for spot)
#   bash launch/tpu_pod.sh setup      # copy this checkout to every worker, install .[tpu], mount
#   bash launch/tpu_pod.sh train      # start training on all workers (background, nohup)
#   bash launch/tpu_pod.sh logs       # copy every worker's log to logs/$TPU_NAME/worker-<i>.log
#   bash launch/tpu_pod.sh tail       # last lines of every worker's log
#   bash launch/tpu_pod.sh stop       # SIGTERM the trainers (they save a checkpoint and exit 0)
#   bash launch/tpu_pod.sh delete
#
# Configuration (environment variables, defaults in brackets):
#   PROJECT [gcloud default]  ZONE [us-east5-a]  TPU_NAME [unimedvl-pod]
#   ACCEL [v5p-128]            the slice; v5p-128 = 64 chips = topology 4x4x4
#   RUNTIME [per generation]   TPU VM image (v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
#                              v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)
#   SPOT [0]                   1 = spot capacity (preemptible)
#   CONFIG [configs/unimedvl_7b.py]
#   MESH_ARGS [--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1]
#                              the mesh that fits, per slice, is in benchmarks/RESULTS.md
#                              ("AOT plan for the 14.6 B model"); the 7b config trains with
#                              --config.model.attention_impl=pallas (EXTRA_ARGS below)
#   EXTRA_ARGS [--config.model.attention_impl=pallas]   more --config.KEY=VALUE overrides
#   BUCKET [required for setup/train]  GCS bucket mounted with gcsfuse at /mnt/$BUCKET on every
#                              worker; the run directory is WORKDIR [/mnt/$BUCKET/runs/$TPU_NAME].
#                              The workdir must be the SAME shared path on all hosts (Orbax
#                              writes one checkpoint from all of them; metrics.jsonl is written
#                              by process 0 only).
#   DATA_ROOT [empty]          --config.data.root (a shared path, e.g. /mnt/$BUCKET/unimed5m);
#                              empty = the embedded synthetic dataset (toy; for a smoke test)
#
# Before a long run, check that the configuration fits the slice, on any CPU machine:
#   python -m unimedvl_jax.inspect --config configs/unimedvl_7b.py --topology $ACCEL \
#       --config.model.attention_impl=pallas $MESH_ARGS
#
# Preemption / resume: the trainer saves a checkpoint on SIGTERM (spot preemption notice,
# `stop`) and every train.checkpoint_every steps; run `train` again with the same WORKDIR and it
# resumes from the newest readable checkpoint (metrics past that step are dropped and re-written,
# so the log stays the uninterrupted run's). A preempted spot/queued slice is deleted by GCE:
# `queued` (or `create`), `setup`, `train` again; the checkpoint lives in the bucket.
set -euo pipefail
cd "$(dirname "$0")/.."

ZONE=${ZONE:-us-east5-a}
TPU_NAME=${TPU_NAME:-unimedvl-pod}
ACCEL=${ACCEL:-v5p-128}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/unimedvl_7b.py}
MESH_ARGS=${MESH_ARGS:---config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1}
EXTRA_ARGS=${EXTRA_ARGS:---config.model.attention_impl=pallas}
BUCKET=${BUCKET:-}
WORKDIR=${WORKDIR:-/mnt/${BUCKET}/runs/${TPU_NAME}}
DATA_ROOT=${DATA_ROOT:-}
REMOTE_DIR=unimedvl_jax
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project "$PROJECT")

case "$ACCEL" in
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  v4-*) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${PROJECT_FLAG[@]}"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }
need_bucket() { [ -n "$BUCKET" ] || { echo "set BUCKET=<gcs bucket> (shared run directory)" >&2; exit 2; }; }
num_workers() {
  tpu describe "$TPU_NAME" --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .
}

cmd=${1:-help}
case "$cmd" in
  create)
    spot=(); [ "$SPOT" = 1 ] && spot=(--spot)
    tpu create "$TPU_NAME" --accelerator-type "$ACCEL" --version "$RUNTIME" "${spot[@]}"
    ;;
  queued)
    spot=(); [ "$SPOT" = 1 ] && spot=(--spot)
    gcloud compute tpus queued-resources create "${TPU_NAME}-qr" --node-id "$TPU_NAME" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" --zone "$ZONE" \
      "${PROJECT_FLAG[@]}" "${spot[@]}"
    echo "waiting for ${TPU_NAME}-qr to become ACTIVE ..."
    until gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" --zone "$ZONE" \
        "${PROJECT_FLAG[@]}" --format='value(state.state)' | grep -q ACTIVE; do sleep 60; done
    ;;
  setup)
    need_bucket
    tarball=$(mktemp -d)/unimedvl_jax.tgz
    git archive --format=tar.gz -o "$tarball" HEAD     # the committed tree of this checkout
    tpu scp "$tarball" "$TPU_NAME":~/unimedvl_jax.tgz --worker=all
    on_all "set -e; mkdir -p ~/$REMOTE_DIR && tar xzf ~/unimedvl_jax.tgz -C ~/$REMOTE_DIR
      cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q -r requirements.txt && .venv/bin/pip install -q -e '.[tpu]'
      if ! mountpoint -q /mnt/$BUCKET; then
        (command -v gcsfuse >/dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s);
          echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" |
            sudo tee /etc/apt/sources.list.d/gcsfuse.list;
          curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -;
          sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; })
        sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET
        gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET
      fi
      .venv/bin/python -c 'import jax; print(jax.__version__)'"
    ;;
  train)
    need_bucket
    data=(); [ -n "$DATA_ROOT" ] && data=(--config.data.root="$DATA_ROOT")
    # The same command on every worker; nohup so it survives the ssh session.
    on_all "cd ~/$REMOTE_DIR && nohup .venv/bin/python -m unimedvl_jax.train --config $CONFIG \
      --workdir $WORKDIR $MESH_ARGS $EXTRA_ARGS ${data[*]} > ~/train.log 2>&1 < /dev/null &
      echo started on \$(hostname)"
    ;;
  logs)
    mkdir -p "logs/$TPU_NAME"
    n=$(num_workers)
    for ((i = 0; i < n; i++)); do
      tpu scp "$TPU_NAME":~/train.log "logs/$TPU_NAME/worker-$i.log" --worker="$i" || true
    done
    echo "logs in logs/$TPU_NAME/ (metrics: $WORKDIR/metrics.jsonl, written by process 0)"
    ;;
  tail)
    on_all "echo == \$(hostname); tail -n ${LINES:-20} ~/train.log"
    ;;
  stop)
    on_all "pkill -TERM -f 'unimedvl_jax.train --config' || true"   # runs on the TPU VMs only
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --zone "$ZONE" \
      "${PROJECT_FLAG[@]}" --quiet 2>/dev/null || true
    ;;
  *)
    sed -n '2,50p' "$0"
    ;;
esac
