"""The steps of the spherical k-means in tokendyn.kmeans, one module each.

    common      input checks, row normalisation, cluster sizes and means, distortion and mean cosine
    seeding     step 1: the seeded generator, the count sketch and greedy k-means++ over-seeding
    ward        step 2: greedy Ward merging of the seed clusters, and its replay down to a chosen K
    choose_k    step 3 (adaptive mode): the loss curves over K and the "fidelity" and "elbow" rules
    lloyd       step 4: Lloyd refinement by cosine, with bounds that skip settled rows on CPU
    repair      step 5: the split/merge move that recovers small objects seeding missed

The entry points (`spherical_kmeans`, `adaptive_kmeans` and their batch forms) and the fit that chains the steps
stay in tokendyn.kmeans. Nothing is imported here, so importing one step does not import the others.
"""
