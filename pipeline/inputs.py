"""A run's data read the way --input says: held in memory (pipeline/data.py) or streamed from files
(pipeline/streaming.py); both give the same interface, pipeline.data.DataInfo."""

from __future__ import annotations

from pipeline.config import Config


def load(config: Config):
    """pipeline.data.load(config), or with config.input "stream" pipeline.streaming.load(config).

    Raises:
        InputError: naming the flag or file, for an unknown, unprepared or malformed dataset.
    """
    if config.input == "stream":
        from pipeline import streaming

        return streaming.load(config)
    from pipeline import data

    return data.load(config)
