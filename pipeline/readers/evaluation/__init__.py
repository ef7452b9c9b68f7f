"""Evaluation of what compressed tokens keep: alterations, methods, retrieval maths, the run, the report."""
