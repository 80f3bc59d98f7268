"""The sampler's old import path, kept so that saved run folders (their config.yaml names
``search.sampling.ConditionalTPESampler``) still resume. New code imports
:mod:`search.study.sampler`."""

from __future__ import annotations

from search.study.sampler import ConditionalTPESampler

__all__ = ["ConditionalTPESampler"]
