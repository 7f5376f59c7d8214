"""batchscope's application: the entry points (`python -m pipeline.train|sweep|advise|evaluate|predict|report`), the
one Config, the run directory, and the modules of training, the study, the advisor, serving and the data."""
