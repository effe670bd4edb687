#!/usr/bin/env bash
# Install a one-machine Slurm for the cluster tests (tests/test_cluster.py): Debian's slurm-wlm and munge.
#
#   slurm-wlm  -> slurmctld, slurmd, sbatch/srun/squeue/scancel/sacct (slurm-client)
#   munge      -> munged and a key (/etc/munge/munge.key), which Slurm authenticates with
#
# Idempotent: nothing is done when every program is already there. Needs apt-get; uses sudo only when not root.
# The daemons are NOT started here (nor as services): the tests start their own munged, slurmctld and slurmd with a
# generated slurm.conf in a temporary folder and stop them afterwards (ood_lib/cluster.py, LocalSlurm).
set -euo pipefail

say() { echo "[install_slurm] $*"; }
have_all() {
    for p in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/bin/squeue /usr/bin/scancel; do
        [[ -x $p ]] || return 1
    done
}

if have_all; then
    say "slurm and munge already installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo '?')"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "[install_slurm] not root and no sudo: install the Debian packages slurm-wlm and munge" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
t0=$SECONDS
# apt's package lists may be missing on a fresh machine: fetch them once, then retry.
if ! $SUDO apt-get install -y --no-install-recommends slurm-wlm munge; then
    say "apt-get install failed; updating the package lists and retrying"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends slurm-wlm munge
fi
# munge's post-install creates a key on most systems; make one where it did not (a container without /dev/urandom
# quirks never needs this, but a missing key makes munged refuse to start).
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    $SUDO mkdir -p /etc/munge
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    $SUDO chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    $SUDO chmod 400 /etc/munge/munge.key
fi
have_all || { echo "[install_slurm] slurm-wlm/munge installed but a program is missing" >&2; exit 1; }
say "installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge in $((SECONDS - t0)) s"
