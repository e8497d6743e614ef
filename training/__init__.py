"""Training the bundled models (not part of the installed library): ``python -m training.train_digits`` and its
siblings, from the repository root. The weights they write ship in ``ertacache/weights``."""
