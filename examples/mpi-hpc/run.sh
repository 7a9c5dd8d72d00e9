#!/usr/bin/env bash
# The llm-offload Flower app as ONE MPI job: rank 0 runs the ServerApp, ranks 1..N the
# ClientApps (no SuperLink, no SuperNodes; weights move as raw MPI buffers).
#
#   examples/mpi-hpc/run.sh                                   # 2 clients, 125m model
#   N_CLIENTS=4 examples/mpi-hpc/run.sh "model-size='tiny' num-server-rounds=5"
#
# Needs `pip install "flwr-transports[mpi,torch]"` (mpiexec comes with the mpich wheel).
# Extra arguments are run-config overrides, as with `flwr run --run-config`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
n="${N_CLIENTS:-2}"
mpiexec="${MPIEXEC:-mpiexec}"
exec "$mpiexec" -n "$((n + 1))" flwr-transports mpi "$here/../llm-offload" \
    --run-config "min-nodes=$n transport='inband' $*"
