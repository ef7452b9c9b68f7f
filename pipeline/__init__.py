"""Corpus-side code of the Token Dynamics pipeline: the compression job (job/), its output (store/), and what
reads that output (readers/)."""
