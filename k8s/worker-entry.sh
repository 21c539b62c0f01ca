#!/bin/sh
# The main process of worker pods: sshd, through which the MPI Operator's launcher starts the ranks; and the
# pod's SIGTERM (eviction, node drain, spot reclaim: kubelet signals only this process) passed on to the ranks
# of this pod, which then agree with the others to stop after the current step with a checkpoint committed
# (worker/src/preempt.rs). The pod stays up meanwhile: terminationGracePeriodSeconds in mpijob.yaml must cover a
# step, an evaluation if one is due, and a checkpoint write.
/usr/sbin/sshd -De -f /etc/ssh/sshd_config &
sshd=$!
trap 'pkill -TERM -x worker; wait "$sshd"' TERM
wait "$sshd"
