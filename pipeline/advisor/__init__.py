"""A batch size and learning rate from a short probe: the probe's measurements (noise scale, step times), the
goodput arithmetic and the advice it writes. It trains through pipeline.training.
"""
