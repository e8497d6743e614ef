"""Peer caching methods, implemented here or applied through diffusers for the side-by-side benchmark."""
