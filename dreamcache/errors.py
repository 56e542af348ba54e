"""Errors that mean "the user must do something": reported as one clear message, never a traceback."""


class PipelineError(RuntimeError):
    pass


class ModelNotFound(PipelineError):
    pass
