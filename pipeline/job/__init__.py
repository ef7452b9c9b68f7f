"""The compression job: sources -> decode -> encode -> compress -> the output store, on Ray Data."""
