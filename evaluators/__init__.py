"""Evaluators score an in-memory candidate model: the search's only signal.

``evaluators.base`` defines the protocol and :class:`~evaluators.base.Scores`;
``evaluators.lm_eval`` adapts EleutherAI's lm-evaluation-harness (the only module that
imports ``lm_eval``); ``evaluators.tasks`` ships task YAMLs and local data.
"""
