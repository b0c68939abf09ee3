#!/usr/bin/env bash
# Trials larger than one machine: every trial trains on NNODES machines x NPROC GPUs (DDP), started by torchrun
# (docs/getting-started/scale.md, "Launch recipes"). Run this script on every machine, each with its NODE_RANK;
# MASTER_ADDR is machine 0, reachable from the others on MASTER_PORT.
#
#   read -rs LIGHTNING_DROPOUT_STORAGE && export LIGHTNING_DROPOUT_STORAGE   # postgresql://user:pass@db/optuna
#   NODE_RANK=0 MASTER_ADDR=node0 bash examples/torchrun_multinode.sh configs/mnist1d_mlp.yaml   # on node0
#   NODE_RANK=1 MASTER_ADDR=node0 bash examples/torchrun_multinode.sh configs/mnist1d_mlp.yaml   # on node1
#
# Every rank runs `tune`; global rank 0 (rank 0 of node 0) alone opens the study: it asks Optuna for each
# trial, sends the trial to the other ranks, reports the metric and stores the result. Only machine 0 needs the
# storage URL (the others are given it all the same: one environment for all). Rank 0 writes TensorBoard.
set -euo pipefail

config="${1:?usage: NODE_RANK=R MASTER_ADDR=HOST bash torchrun_multinode.sh CONFIG.yaml [overrides]}"
shift
nnodes="${NNODES:-2}"
nproc="${NPROC:-8}"                     # GPUs per machine (processes per machine: one per GPU)
accelerator="${ACCELERATOR:-gpu}"

exec torchrun \
  --nnodes="$nnodes" \
  --nproc-per-node="$nproc" \
  --node-rank="${NODE_RANK:?set NODE_RANK (0 on the machine at MASTER_ADDR)}" \
  --master-addr="${MASTER_ADDR:?set MASTER_ADDR (machine 0)}" \
  --master-port="${MASTER_PORT:-29500}" \
  -m lightning_dropout.cli tune "$config" \
  --trainer.num_nodes="$nnodes" --trainer.devices="$nproc" --trainer.strategy=ddp \
  --trainer.accelerator="$accelerator" --study.workers=1 "$@"
