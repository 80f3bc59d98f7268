"""The demo model family, built offline by the installed tool.

``python -m search.demo`` (or ``models.build_demo: true`` in a search) trains a tiny
Llama base on synthetic skills and one expert per skill (:mod:`.build`), with the
training loop in :mod:`.train` and the tiny configs and tokenizer in :mod:`.tiny`.
"""
