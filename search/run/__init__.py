"""Running a search: the space, baselines, the driver, executors, workers and progress.

:func:`search.run.launch.run_search` is the entry point: from a validated config to a
finished, stored search.
"""
