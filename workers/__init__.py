"""Inference workers: one process per (engine, device) of each loaded model (a lane), each owning one engine."""
