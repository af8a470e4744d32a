"""Evaluation: collapse monitors, feature extraction, linear probe, k-NN."""
