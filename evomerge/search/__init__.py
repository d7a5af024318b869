"""Evolutionary search over merge parameters: spaces, candidate builder, Optuna study, run loop, export."""
