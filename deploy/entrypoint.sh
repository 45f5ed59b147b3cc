#!/bin/sh
# Entry point of the CREST images. A Ray driver (`crest serve --ray-address HOST:PORT`) needs a Ray node on its
# own machine, so when RAY_JOIN_ADDRESS is set this container first joins that cluster as a node with no CPUs
# (selector actors run on the workers), then runs the command.
set -eu
if [ -n "${RAY_JOIN_ADDRESS:-}" ]; then
    ray start --address="${RAY_JOIN_ADDRESS}" --num-cpus=0 --disable-usage-stats
fi
exec "$@"
