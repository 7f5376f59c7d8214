"""One training run, `fit_loop.train(config) -> Summary`: the compiled model, optimizers and schedules, how the step
executes, the run's callback list, checkpoints and resume, time to target, and data-parallel distribution. It may
use pipeline.serving (the export at a run's end) and pipeline.data, never the study or the advisor.
"""
