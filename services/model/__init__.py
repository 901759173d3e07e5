"""The model contract shared by the trainer (which trains it) and the ranker (which serves it).

Neither service owns it: `network` is the torch model, `artifact` the published file format.
"""
