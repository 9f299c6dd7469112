"""d2_reclass's log lines go wherever detectron2's own logging was set up, once.

detectron2 projects set up logging with ``default_setup`` / ``setup_logger``, which attach
handlers to the ``detectron2`` and ``fvcore`` loggers only, and those do not propagate. A
library logger under another name would reach nobody's console or ``log.txt``. So the
``d2_reclass`` logger hands each record to the ``detectron2`` logger's handlers; where
detectron2 has none, to the root logger's (``logging.basicConfig`` users, pytest's caplog);
where nothing is set up, warnings go to stderr as Python's default does. A user who gives
``d2_reclass`` handlers of its own (``setup_logger(name="d2_reclass")``) gets just those.
Like detectron2's loggers it does not propagate, so no line is shown twice.
"""
import logging

__all__ = ["install_detectron2_forwarding"]

_PACKAGE = "d2_reclass"


class _ToDetectron2Handlers(logging.Handler):
    """Emits each record through the handlers detectron2's own lines go to (console, log.txt)."""

    def emit(self, record: logging.LogRecord) -> None:
        if any(h is not self for h in logging.getLogger(_PACKAGE).handlers):
            return  # set up on its own: those handlers print it
        targets = logging.getLogger("detectron2").handlers or logging.getLogger().handlers
        for handler in targets:
            if record.levelno >= handler.level:
                handler.handle(record)
        if not targets and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def install_detectron2_forwarding() -> None:
    """Attach the forwarding handler to the ``d2_reclass`` logger (once), at INFO level unless
    a level was set, so that the mapping table and report path are shown like detectron2's
    own INFO lines."""
    package = logging.getLogger(_PACKAGE)
    if not any(isinstance(h, _ToDetectron2Handlers) for h in package.handlers):
        package.addHandler(_ToDetectron2Handlers())
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    package.propagate = False
