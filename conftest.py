"""Collection settings of the default test run (pyproject.toml adds ``--doctest-modules``).

Every module of ``search/`` and ``evaluators/`` is imported for its docstring examples,
except lm-eval's task folder, whose Python files lm-eval loads itself from YAML.
"""

collect_ignore = ["evaluators/tasks"]
