"""Deduplication and benchmark decontamination: text and image matching, benchmark registries."""
