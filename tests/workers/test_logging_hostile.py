"""logging_utils with hostile values: every call makes one line a UTF-8 file can hold, and a
structured line is strict JSON (no NaN) with the core fields, whatever the value and wherever
it comes in (a field, a format argument, the message, a stdlib ``extra``, the bound context)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from backend.workers.shared.logging_utils import CORE_FIELDS, WorkerLogger, log_context


class _NoText:
    """An object whose ``str`` and ``repr`` both raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _cycle() -> dict[str, Any]:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    return loop


def _deep() -> list[Any]:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    return deep


HOSTILE: list[tuple[str, Any]] = [
    ("lone surrogate", "bad \udcff text"),
    ("control characters", "a\x00b\x1b[31mc\r\nd\x7f"),
    ("huge text", "x" * 1_000_000),
    ("int past the digit limit", 10**5000),
    ("nan", float("nan")),
    ("infinity", float("-inf")),
    ("bytes", b"\xff\x00"),
    ("no str, no repr", _NoText()),
    ("cycle", _cycle()),
    ("non-string key", {(1, 2): "v", 3: "w"}),
    ("nested 100,000 deep", _deep()),
    ("plain object", object()),
    ("set", {1, 2}),
]
IDS = [name for name, _ in HOSTILE]
VALUES = [value for _, value in HOSTILE]


def _strict(text: str) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record = json.loads(text, parse_constant=refuse)
    assert isinstance(record, dict)
    return record


@pytest.fixture(params=["structured", "simple"])
def log_file(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "log.txt"
    with path.open("w", encoding="utf-8") as stream:
        WorkerLogger.configure(log_level="INFO", log_format=request.param, worker_name="w",
                               stream=stream)
        try:
            yield request.param, path
        finally:
            WorkerLogger.reset()
            logging.getLogger().setLevel(logging.WARNING)


@contextmanager
def _our_handler_only() -> Iterator[None]:
    """Inside: pytest's capture handlers off the root logger (they format records their own
    way, and fail on some of these values); ours stays."""
    root = logging.getLogger()
    others = [h for h in root.handlers if type(h).__module__.startswith("_pytest")]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


def _lines(log_format: str, path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")  # strict: a lone surrogate would fail here
    if log_format == "simple":
        return [line for line in text.splitlines() if line[:4].isdigit()]  # heads only
    return text.splitlines()


@pytest.mark.parametrize("value", VALUES, ids=IDS)
def test_every_way_in_makes_one_good_line(log_file: tuple[str, Path], value: Any) -> None:
    log_format, path = log_file
    log = WorkerLogger.get_logger("hostile")
    stdlib = logging.getLogger("hostile.stdlib")
    with _our_handler_only():
        log.info("as a field", value=value)
        log.info("as an argument %s", value)
        log.info(value)
        stdlib.warning("stdlib %s", value, extra={"value": value})
        with log_context(bound=value):
            log.info("in a context")
        try:
            raise ValueError(value)
        except ValueError:
            log.exception("an exception carrying it")
    written = 6
    if log_format == "simple":
        assert len(_lines(log_format, path)) == written
        return
    records = [_strict(line) for line in _lines(log_format, path)]
    assert len(records) == written
    for record in records:
        assert list(record)[:6] == list(CORE_FIELDS)
    assert records[0]["message"] == "as a field" and "value" in records[0]
    assert records[1]["message"].startswith("as an argument ")
    assert records[3]["logger"] == "hostile.stdlib" and "value" in records[3]
    assert "bound" in records[4]
    assert records[5]["exception"]["type"] == "ValueError"


@pytest.mark.parametrize(("args", "message"), [
    (("%s and %s", 1), "%s and %s (1,)"),
    (("%d", "x"), "%d ('x',)"),
    (("%(key)s", {"other": 1}), "%(key)s {'other': 1}"),
    (("%s", _NoText()), "%s (<unprintable _NoText>)"),
])
def test_arguments_that_do_not_fit_keep_the_text(log_file: tuple[str, Path], args: tuple[Any, ...],
                                                 message: str) -> None:
    log_format, path = log_file
    with _our_handler_only():
        WorkerLogger.get_logger("hostile").info(*args)
        logging.getLogger("hostile.stdlib").info(*args)
    lines = _lines(log_format, path)
    if log_format == "structured":
        assert [_strict(line)["message"] for line in lines] == [message, message]
    else:
        assert all(line.endswith(message) for line in lines) and len(lines) == 2


def test_a_stdlib_extra_with_a_non_string_key(log_file: tuple[str, Path]) -> None:
    log_format, path = log_file
    with _our_handler_only():
        logging.getLogger("hostile.stdlib").info("odd extra", extra={7: "seven"})
    (line,) = _lines(log_format, path)
    if log_format == "structured":
        assert _strict(line)["7"] == "seven"
    else:
        assert line.endswith("odd extra 7=seven")


def test_a_cycle_keeps_the_other_fields(log_file: tuple[str, Path]) -> None:
    log_format, path = log_file
    with _our_handler_only():
        WorkerLogger.get_logger("hostile").info("cycle", loop=_cycle(), ratio=float("nan"), n=3)
    (line,) = _lines(log_format, path)
    if log_format == "structured":
        record = _strict(line)
        assert record["loop"]["name"] == "loop" and '"self": "<cycle>"' in line
        assert (record["ratio"], record["n"]) == ("nan", 3)
    else:
        assert "ratio=nan n=3" in line


# exc_info given while another exception is being handled: the line names the exception given
# (or the one being handled, for True), and none for a value that names no exception.
EXC_INFO = [
    ("true", True, "KeyError"),
    ("an exception", ValueError("given"), "ValueError"),
    ("a tuple", (TypeError, TypeError("given"), None), "TypeError"),
    ("an empty tuple", (None, None, None), None),
    ("text", "yes", None),
    ("a number", 1, None),
    ("a bad tuple", (1, 2, 3), None),
    ("a short tuple", (ValueError,), None),
    ("false", False, None),
]


@pytest.mark.parametrize(("exc_info", "named"), [case[1:] for case in EXC_INFO],
                         ids=[case[0] for case in EXC_INFO])
def test_exc_info_names_only_the_exception_it_gives(log_file: tuple[str, Path], exc_info: Any,
                                                    named: str | None) -> None:
    log_format, path = log_file
    with _our_handler_only():
        try:
            raise KeyError("being handled")
        except KeyError:
            WorkerLogger.get_logger("hostile").info("structlog", exc_info=exc_info)
    text = path.read_text(encoding="utf-8")
    if log_format == "structured":
        (line,) = text.splitlines()
        exception = _strict(line).get("exception")
        assert (exception or {}).get("type") == named
    else:
        assert ("Traceback" in text or f"{named}: given" in text) == (named is not None)
        assert ("KeyError" in text) == (named == "KeyError")


def test_non_string_keys_read_the_same_whether_or_not_the_line_needed_rewriting(
    log_file: tuple[str, Path],
) -> None:
    log_format, path = log_file
    keys = {True: 1, False: 2, None: 3, 1.5: 4, 7: 5}
    with _our_handler_only():
        log = WorkerLogger.get_logger("hostile")
        log.info("plain", m=keys)
        log.info("rewritten", m=keys, ratio=float("nan"))  # NaN: the first encode fails
    lines = _lines(log_format, path)
    if log_format == "structured":
        plain, rewritten = (_strict(line)["m"] for line in lines)
        assert plain == rewritten == json.loads(json.dumps(keys))
    else:
        assert all(f"m={keys}" in line for line in lines) and len(lines) == 2
