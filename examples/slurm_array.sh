#!/usr/bin/env bash
# One `lightning-dropout tune` per SLURM array task, every task joining the same study in PostgreSQL
# (docs/getting-started/scale.md, "Launch recipes"). Each task gets one node's GPUs; its workers divide them.
#
# The storage URL (its password included) comes from the environment, never from the command line, which
# lands in the shell history, in `ps` and in SLURM's accounting (`sacct` shows the command):
#
#   read -rs LIGHTNING_DROPOUT_STORAGE && export LIGHTNING_DROPOUT_STORAGE   # postgresql://user:pass@db/optuna
#   sbatch examples/slurm_array.sh configs/mnist1d_mlp.yaml [--trainer.devices=2 ...]
#
# `--export=ALL` (SLURM's default) hands the submitting shell's environment to every task.
#SBATCH --job-name=dropout-tune
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --export=ALL
#SBATCH --output=dropout-tune-%A_%a.out
set -euo pipefail

config="${1:?usage: sbatch slurm_array.sh CONFIG.yaml [overrides]}"
shift
: "${LIGHTNING_DROPOUT_STORAGE:?export the storage URL of the study (postgresql://...) before sbatch, not on the command line}"
task="${SLURM_ARRAY_TASK_ID:?run this script through sbatch (an array job)}"

# SLURM sets CUDA_VISIBLE_DEVICES to this task's GPUs: `--workers auto` runs as many workers as trials of
# trainer.devices GPUs fit on them. Each task writes its runs under its own folder (shared file system:
# `tensorboard --logdir ${RUN_DIR:-runs}` shows every task's trials).
exec lightning-dropout tune "$config" --workers auto --study.run_dir="${RUN_DIR:-runs}/task_${task}" "$@"
