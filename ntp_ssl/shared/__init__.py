"""Pieces every stage uses, below the stages: checkpoints, run directories, the fit loop,
masking, feature extraction, kNN, and the start of a stage."""
