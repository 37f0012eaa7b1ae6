"""Inference workers: one process per device, each owning one engine."""
