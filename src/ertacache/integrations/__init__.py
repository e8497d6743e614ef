"""Integrations around the pure-torch core (diffusers pipelines)."""
