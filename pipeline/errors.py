"""The one line a stage that fails for a known reason leaves behind.

Every stage module ends with

    if __name__ == "__main__":
        sys.exit(run_main(main))

A `StageError` (bad or missing data, a damaged checkpoint, a storage operation that cannot succeed,
an unusable tokenizer, task data or eval bundle that cannot be had) already names the file and says
what is wrong, so `run_main` prints it as `error: <message>` on one line of stderr and exits 1. A
stack trace would add nothing for these, and it would push the message out of the few last log
lines the operator copies into the run's status (`kubectl describe llmrun`) and the local executor
prints. Under torchrun the line also goes into the worker's error file, so torchrun's failure
summary, printed after it, repeats it. Any other exception is a bug: it keeps its traceback.

Torch-free on purpose: tok_train and tok_eval use it too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

ERROR_EXIT_CODE = 1


class StageError(RuntimeError):
    """A failure its message fully explains (which file, what is wrong): a stage ends on it with one line."""


def one_line(err: BaseException) -> str:
    """The error's message with its line breaks folded (a library's message may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _tell_torchrun(line: str) -> None:
    """Leave `line` in the error file torchrun gives each worker (TORCHELASTIC_ERROR_FILE): its
    failure summary then ends with `traceback : <line>`, not a link to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                # the layout torch's own @record writes; the summary shows "py_callstack"
                info = {"py_callstack": line, "timestamp": str(int(time.time()))}
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
        except OSError:
            pass  # the line is on stderr anyway


def run_main(main: Callable[[], int]) -> int:
    """Run a stage's `main()`; a `StageError` becomes `error: <message>` on stderr and exit code 1."""
    try:
        return main()
    except StageError as err:
        line = f"error: {one_line(err)}"
        print(line, file=sys.stderr, flush=True)
        _tell_torchrun(line)
        return ERROR_EXIT_CODE
