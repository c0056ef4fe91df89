"""Everything that imports Ray: the cluster, resources, the guide-cache job, the TorchTrainer,
resume and export; the job paths."""
