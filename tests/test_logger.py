"""d2_reclass's log lines reach whatever detectron2's logging setup reaches, and only once.

Each case runs in a fresh interpreter: logging setup (``setup_logger`` is cached per process)
is global state that a test must not leave behind.
"""
import subprocess
import sys
import textwrap


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_lines_reach_log_txt_and_console_after_detectron2_setup_logger(tmp_path):
    proc = _run(f"""
        import logging
        from detectron2.utils.logger import setup_logger
        import d2_reclass

        setup_logger(output={str(tmp_path)!r})
        logging.getLogger("d2_reclass.integration.checkpoint").info("mapping table here")
        logging.getLogger("d2_reclass.integration.config").warning("NUM_CLASSES corrected")
        logging.getLogger("d2_reclass.integration.checkpoint").debug("not shown at INFO")
    """, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert "d2_reclass.integration.checkpoint INFO: mapping table here" in log
    assert "d2_reclass.integration.config WARNING: NUM_CLASSES corrected" in log
    assert "not shown at INFO" not in log
    assert proc.stdout.count("mapping table here") == 1
    assert proc.stdout.count("NUM_CLASSES corrected") == 1


def test_a_d2_reclass_logger_set_up_on_its_own_prints_each_line_once(tmp_path):
    proc = _run("""
        import logging
        from detectron2.utils.logger import setup_logger
        import d2_reclass

        setup_logger()
        setup_logger(name="d2_reclass")
        logging.getLogger("d2_reclass.engine.surgery").info("once please")
    """, tmp_path)
    assert proc.stdout.count("once please") == 1


def test_with_no_logging_set_up_warnings_still_reach_stderr(tmp_path):
    proc = _run("""
        import logging
        import d2_reclass

        logging.getLogger("d2_reclass.classes").warning("close names")
        logging.getLogger("d2_reclass.classes").info("quiet")
    """, tmp_path)
    assert "close names" in proc.stderr
    assert "quiet" not in proc.stderr + proc.stdout


def test_with_only_a_root_handler_lines_go_there(tmp_path):
    proc = _run("""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="root: %(message)s")
        import d2_reclass

        logging.getLogger("d2_reclass.integration.checkpoint").info("table")
    """, tmp_path)
    assert proc.stdout.splitlines().count("root: table") == 1


def test_with_root_and_detectron2_set_up_each_line_is_shown_once_like_detectron2s(tmp_path):
    proc = _run("""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="root: %(message)s")
        from detectron2.utils.logger import setup_logger
        import d2_reclass

        setup_logger()
        logging.getLogger("detectron2.x").info("theirs")
        logging.getLogger("d2_reclass.integration.checkpoint").info("ours")
    """, tmp_path)
    assert proc.stdout.count("theirs") == 1 and proc.stdout.count("ours") == 1
    assert "root: ours" not in proc.stdout
