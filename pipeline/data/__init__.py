"""Where a run's examples come from: the sources (bundled digits, TFDS, folder:, npz:) read into memory, the tf.data
pipelines over them, and the same data streamed from its files (--input stream). Every random choice is a function
of (seed, epoch), which is what makes resume exact.
"""
