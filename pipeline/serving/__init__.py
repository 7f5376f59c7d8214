"""The exported model and its use: the SavedModel export in TF Serving's layout with its warmup requests and
batching file, loading it back, throughput by request batch, evaluation of an export with its metrics and figures,
and the client of `python -m pipeline.predict`.
"""
