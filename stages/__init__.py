"""Thin click commands, one per DVC stage: parse params, call ``pipeline``, write declared outputs."""
