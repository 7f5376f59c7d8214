"""A run's data read the way --input says: held in memory (pipeline/data/in_memory.py) or streamed from files
(pipeline/data/streamed.py); both give the same interface, pipeline.data.in_memory.DataInfo."""

from __future__ import annotations

from pipeline.config import Config


def load(config: Config):
    """pipeline.data.in_memory.load(config), or with config.input "stream" pipeline.data.streamed.load(config).

    Raises:
        InputError: naming the flag or file, for an unknown, unprepared or malformed dataset.
    """
    if config.input == "stream":
        from pipeline.data import streamed

        return streamed.load(config)
    from pipeline.data import in_memory

    return in_memory.load(config)
