"""One family of errors. Each message says what was wrong and what to do next."""


class BOMergeError(Exception):
    """Base class of every error a user can cause; the CLI prints it as one paragraph, no traceback."""


class RevisionError(BOMergeError):
    """A revision spec names nothing, or cannot be parsed."""


class HubError(BOMergeError):
    """The Hub (or a local source) cannot give what was asked: missing repo, no access, no files."""


class CheckpointError(BOMergeError):
    """Checkpoints cannot be merged: different names/shapes, corrupt files, NaN/inf."""


class CorruptFileError(CheckpointError):
    """A weight file is truncated or corrupt (a Hub download is then fetched again, once)."""


class UnsafeFileError(CheckpointError):
    """A revision names a file outside itself (a shard index's absolute or `..` path): refused before any byte
    of it is read."""


class ChangedFileError(CheckpointError):
    """A weight file changed (rewritten, truncated, replaced) while a run was reading it."""


class WeightsError(BOMergeError):
    """A weight vector is invalid (wrong length, negative, does not sum to 1)."""


class DataError(BOMergeError):
    """The held-out data is missing, empty, lacks its columns or is too short; or a metric objective cannot load."""


class OutputError(BOMergeError):
    """The output folder cannot be written as asked."""


class StudyError(BOMergeError):
    """The Optuna study cannot be created or resumed as asked."""


class WatchError(BOMergeError):
    """`hf-bomerge watch` cannot go on as asked (its output folder is busy or not its own, too few revisions)."""


class RecipeError(BOMergeError):
    """A recipe (a bomerge_recipe.yaml, or the one a study records) cannot be read: a field is missing or malformed."""


class OptionError(BOMergeError):
    """A value no run accepts, or options that cannot go together: refused when the specs are built, before
    anything heavy is imported (`hf_bomerge.cli.options`)."""


class DuplicateError(RevisionError):
    """Revisions serve identical weights and `--on-duplicate error` was asked, or fewer than two distinct
    payloads remain once they are merged once."""


class MissingExtraError(BOMergeError):
    """An optional part of hf-bomerge (an extra such as `lm-eval`) is asked for and is not installed."""
