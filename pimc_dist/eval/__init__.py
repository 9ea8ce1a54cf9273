"""Downstream evaluation: tasks, metrics, linear probes, fine-tuning, result tables."""
