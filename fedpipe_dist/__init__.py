"""fedpipe_dist: FedPipe (arXiv 2404.06448) federated parameter-efficient fine-tuning as an HPC job suite."""

__version__ = "0.1.0"
