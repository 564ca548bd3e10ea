"""The one base class of the errors a user can cause (bad params, data, model or store).

Stages print these as one clear message and exit non-zero; anything else is a bug and keeps
its traceback.
"""


class PipelineError(ValueError):
    """Bad input: the message names the item, file or parameter and what to do."""
