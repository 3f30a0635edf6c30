"""The one base of the errors whose message is the whole diagnosis: what is wrong and how to fix it."""


class UserError(Exception):
    """Raised for bad input or damaged files, never for a bug in c2r. A single run prints it as one line (its
    traceback goes to the run folder's ``FAILED``); in a sweep it fails that job alone, as any error does."""
