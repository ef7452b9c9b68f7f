"""Search over the output: MaxSim maths, text towers, and the VideoSearch API."""
