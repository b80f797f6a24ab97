"""The one logging set-up (medgemma_deploy/logs.py), and every entry point using it."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from transformers.utils import logging as transformers_logging

from medgemma_deploy.logs import BATCH_FORMAT, CHATTY_LIBRARIES, PACKAGE, SERVICE_FORMAT, configure_logging

#: the loggers the set-up touches: ours, captured warnings, and the root (services only)
TOUCHED = (PACKAGE, "py.warnings", None)


def _chatty_levels() -> tuple[int, ...]:
    return tuple(logging.getLogger(name).level for name in CHATTY_LIBRARIES)


def logging_state() -> dict[str, object]:
    """What the set-up may change, as comparable values (handlers by identity)."""
    state: dict[str, object] = {
        (name or "root"): (tuple(logger.handlers), logger.level, logger.propagate)
        for name in TOUCHED
        for logger in [logging.getLogger(name)]
    }
    state["chatty"] = _chatty_levels()
    state["warnings"] = warnings.showwarning
    state["transformers"] = (
        transformers_logging.get_verbosity(),
        transformers_logging.is_progress_bar_enabled(),
    )
    state["env"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    return state


def _ours(handler: logging.Handler) -> bool:
    return type(handler).__module__ == "medgemma_deploy.logs"


def setup_seen() -> dict[str, object]:
    """The set-up in force, as the entry points leave it: formats and levels, not handler objects."""

    def ours(name: str | None) -> list[str]:
        return [h.formatter._fmt for h in logging.getLogger(name).handlers if _ours(h)]

    return {
        "package": (logging.getLogger(PACKAGE).level, logging.getLogger(PACKAGE).propagate, ours(PACKAGE)),
        "warnings": (
            logging.getLogger("py.warnings").level,
            ours("py.warnings"),
            warnings.showwarning.__module__,
        ),
        "root": (logging.getLogger().level, ours(None)),
        "chatty": _chatty_levels(),
        "transformers": transformers_logging.get_verbosity(),
    }


@pytest.fixture
def restored_logging():
    """Entry points that own their process (services, apps) never undo the set-up: this does.

    pytest attaches its own handlers to the loggers between a test's phases: only ours are removed.
    """
    before = logging_state()
    yield
    for name in TOUCHED:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if _ours(h)]:
            logger.removeHandler(handler)
        _, level, logger.propagate = before[name or "root"]
        logger.setLevel(level)  # (not ``logger.level =``: setLevel clears the loggers' level caches)
    for name, level in zip(CHATTY_LIBRARIES, before["chatty"], strict=True):
        logging.getLogger(name).setLevel(level)
    if before["warnings"] is not warnings.showwarning:
        logging.captureWarnings(False)
        warnings.showwarning = before["warnings"]
    verbosity, progress_bars = before["transformers"]
    transformers_logging.set_verbosity(verbosity)
    if progress_bars:
        transformers_logging.enable_progress_bar()
    if before["env"] is None:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)


@contextmanager
def configured(level: int, *, service: bool = False) -> Iterator[None]:
    """:func:`configure_logging` for the ``with`` block."""
    restore = configure_logging(level, service=service)
    try:
        yield
    finally:
        restore()


def expected_setup(level: int, service: bool) -> dict[str, object]:
    """What :func:`configure_logging` itself leaves in force (and then undoes)."""
    with configured(level, service=service):
        return setup_seen()


# --- the set-up itself ----------------------------------------------------------------------


@pytest.mark.parametrize("service", [False, True], ids=["batch", "service"])
@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["default", "-v"])
def test_restore_puts_everything_back(level, service):
    before = logging_state()
    restore = configure_logging(level, service=service)
    assert logging_state() != before
    restore()
    assert logging_state() == before


def test_our_lines_go_to_stderr_at_info_and_debug_with_v(capsys):
    log = logging.getLogger(f"{PACKAGE}.some.module")
    with configured(logging.INFO):
        log.info("loaded 2 studies")
        log.debug("hidden detail")
    with configured(logging.DEBUG):
        log.debug("shown detail")
    assert capsys.readouterr().err.splitlines() == ["INFO loaded 2 studies", "DEBUG shown detail"]


def test_library_warnings_are_hidden_without_v_and_shown_with_it(capsys):
    with configured(logging.INFO):
        warnings.warn("Invalid value for VR UI: '1.2.x'", UserWarning, stacklevel=1)
    assert "Invalid value" not in capsys.readouterr().err
    with configured(logging.DEBUG):
        warnings.warn("Invalid value for VR UI: '1.2.x'", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.startswith("WARNING ") and "Invalid value for VR UI" in err


def test_third_party_chatter_is_quiet_without_v():
    untouched = _chatty_levels()
    with configured(logging.INFO):
        assert transformers_logging.get_verbosity() == logging.ERROR
        assert not transformers_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert _chatty_levels() == (logging.WARNING,) * len(CHATTY_LIBRARIES)
    with configured(logging.DEBUG):
        assert transformers_logging.get_verbosity() < logging.ERROR  # its notices come back with -v
        assert not transformers_logging.is_progress_bar_enabled()
        assert _chatty_levels() == untouched


def test_highdicom_chatter_stays_off_even_under_a_root_handler_at_info(capsys):
    # A MONAI Deploy app: its SDK puts a handler on the root logger at INFO (or its -l level).
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with configured(logging.INFO):
            logging.getLogger("highdicom.base").info('copy attributes of module "Patient"')
            logging.getLogger("highdicom.base").warning("a real problem")
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
    assert capsys.readouterr().err.splitlines() == ["a real problem"]


def test_a_command_leaves_other_libraries_and_the_root_logger_alone(capsys):
    root_handlers = tuple(logging.getLogger().handlers)
    with configured(logging.INFO):
        assert tuple(logging.getLogger().handlers) == root_handlers
        logging.getLogger("highdicom.seg").info("library detail")
    assert "library detail" not in capsys.readouterr().err


def test_a_service_stamps_its_lines_and_shows_library_warnings_in_the_same_format(capsys):
    library = logging.getLogger("pynetdicom.assoc")
    chosen = logging.getLogger("pynetdicom.dimse")
    chosen.setLevel(logging.DEBUG)  # a service may turn one library up (the listener does with -v)
    try:
        with configured(logging.INFO, service=True):
            logging.getLogger(f"{PACKAGE}.listener.service").info("listening on 11112")
            library.info("library chatter")
            library.warning("association rejected")
            chosen.debug("P-DATA received")
    finally:
        chosen.setLevel(logging.NOTSET)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        f"INFO {PACKAGE}.listener.service: listening on 11112",
        "WARNING pynetdicom.assoc: association rejected",
        "DEBUG pynetdicom.dimse: P-DATA received",
    ]
    assert all(line[:4].isdigit() for line in lines), lines  # the time comes first


def test_a_host_that_captures_warnings_keeps_capturing():
    logging.captureWarnings(True)
    try:
        configure_logging(logging.INFO)()
        assert warnings.showwarning.__module__ == "logging"
    finally:
        logging.captureWarnings(False)


def test_the_formats():
    assert expected_setup(logging.INFO, False)["package"] == (logging.INFO, False, [BATCH_FORMAT])
    assert expected_setup(logging.DEBUG, True)["package"] == (logging.DEBUG, False, [SERVICE_FORMAT])
    assert expected_setup(logging.INFO, True)["root"] == (logging.WARNING, [SERVICE_FORMAT])


# --- every entry point uses it ---------------------------------------------------------------


def _cli(argv, monkeypatch, probe):
    from medgemma_deploy.cli import listen, main, worker

    monkeypatch.setattr(main, "_run_pipeline", lambda args: probe())
    monkeypatch.setattr(worker, "run", lambda args: probe())
    monkeypatch.setattr(listen, "run", lambda args: probe())
    return main.main(argv)


def _listener(argv, monkeypatch, probe):
    from medgemma_deploy.cli import listen

    monkeypatch.setattr(listen, "run", lambda args: probe())
    return listen.main(argv)


def _worker(argv, monkeypatch, probe):
    worker_main = importlib.import_module("medgemma_deploy.apps.worker.__main__")
    monkeypatch.setattr(worker_main, "run", lambda args: probe())
    return worker_main.main(argv)


def _monai_app(argv, monkeypatch, probe):
    pytest.importorskip("holoscan", reason="the MONAI Deploy extra (holoscan) is not installed")
    from medgemma_deploy.apps import holoscan_runtime

    class ProbeApp:
        engine = None

        def __init__(self, argv: list[str], settings: object) -> None:
            pass

        def run(self) -> None:
            probe()

        def final_results(self) -> SimpleNamespace:
            return SimpleNamespace(exit_code=0)

    monkeypatch.setattr(holoscan_runtime, "ensure_stack_size", lambda module, argv: None)
    return holoscan_runtime.run_app(ProbeApp, "medgemma_deploy.apps.classify", argv)


IO = ["-i", "in", "-o", "out", "-m", "models"]
ENTRY_POINTS = [
    pytest.param(_cli, ["classify", *IO], logging.INFO, False, id="medgemma-deploy classify"),
    pytest.param(_cli, ["-v", "classify", *IO], logging.DEBUG, False, id="medgemma-deploy -v classify"),
    pytest.param(_cli, ["worker"], logging.INFO, True, id="medgemma-deploy worker"),
    pytest.param(_cli, ["-v", "listen"], logging.DEBUG, True, id="medgemma-deploy -v listen"),
    pytest.param(_listener, [], logging.INFO, True, id="apps.listener"),
    pytest.param(_listener, ["-v"], logging.DEBUG, True, id="apps.listener -v"),
    pytest.param(_worker, [], logging.INFO, True, id="apps.worker"),
    pytest.param(_worker, ["-v"], logging.DEBUG, True, id="apps.worker -v"),
    pytest.param(_monai_app, IO, logging.INFO, False, id="apps.classify"),
    pytest.param(_monai_app, [*IO, "-l", "debug"], logging.DEBUG, False, id="apps.classify -l DEBUG"),
]


@pytest.mark.filterwarnings("ignore:Current stack size:RuntimeWarning")  # holoscan, on import
@pytest.mark.parametrize(("entry", "argv", "level", "service"), ENTRY_POINTS)
def test_every_entry_point_uses_the_one_set_up(entry, argv, level, service, monkeypatch, restored_logging):
    seen: list[dict[str, object]] = []

    def probe() -> int:
        seen.append(setup_seen())
        return 0

    expected, before = expected_setup(level, service), setup_seen()
    assert entry(argv, monkeypatch, probe) == 0
    assert seen == [expected]
    assert expected != before
    if entry is _cli:  # the one entry point a host calls in-process: it leaves logging as it was
        assert setup_seen() == before


def test_the_entry_point_check_tells_the_set_ups_apart():
    # Control: the comparison above distinguishes a command, -v and a service.
    setups = [
        expected_setup(level, service) for level in (logging.INFO, logging.DEBUG) for service in (False, True)
    ]
    assert all(a != b for i, a in enumerate(setups) for b in setups[i + 1 :])
