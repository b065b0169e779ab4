#!/bin/bash
# LSEP training on several SLURM nodes: one torchrun per node, one process per GPU.
#
#   sbatch scripts/slurm_train.sh --model SiT-XL/2 --exp-name xl-4nodes --data-dir /data/imagenet256 \
#       --batch-size 256 --mixed-precision bf16
#
# Every flag goes to train.py unchanged. --batch-size is the global batch (split over all GPUs of
# all nodes), so the numbers equal those of one 8-GPU node. --output-dir and --data-dir must be on
# a file system every node sees. The job resumes from its latest checkpoint when it is requeued.
#SBATCH --job-name=lsep
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the first node
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
cd "${SLURM_SUBMIT_DIR:-.}"

# srun starts the quoted command once per node; each node reads its own $SLURM_NODEID there.
srun --kill-on-bad-exit=1 bash -c 'exec torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    train.py --resume-step -1 "$@"' slurm_train "$@"
