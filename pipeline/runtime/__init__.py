"""What a run needs from the machine it runs on: SLURM and preemption (cluster), the processes of a multi-GPU run (ranks), progress lines (progress)."""
