"""Searching the weights: the search spaces (`weight_spaces`), the Optuna study and its storage
(`study`, `storage`), several workers on one study (`workers`), and rolling searches while a run trains
(`watch`)."""
