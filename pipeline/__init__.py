"""Corpus-side code of the Token Dynamics pipeline: sources, decoding, encoders, Ray stages and storage."""
