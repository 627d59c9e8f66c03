"""Reading checkpoint files as untrusted input: which files hold a revision's weights (`layout`), their
formats validated (`formats`), the lazy view over N checkpoints (`checkpoints`), and what sampled tensors say
about the window (`phase`)."""
