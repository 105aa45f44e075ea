import pytest

from celery_health_exporter.state.events import MalformedEvent, decode_body, exception_class


def test_single_event_and_task_multi_batch():
    assert decode_body(b'{"type": "task-started", "uuid": "u"}') == [{"type": "task-started", "uuid": "u"}]
    assert len(decode_body('[{"type": "a"}, {"type": "b"}]')) == 2


@pytest.mark.parametrize("body, reason", [(b"{not json", "json"), (b'"text"', "not_an_object"), (b"\xff", "json")])
def test_bad_bodies(body, reason):
    with pytest.raises(MalformedEvent) as info:
        decode_body(body)
    assert info.value.reason == reason


@pytest.mark.parametrize("text, expected", [
    ("CustomError('boom')", ("CustomError", False)),
    ("tests.apps.testapp.CustomError('boom')", ("CustomError", False)),
    ("KeyError: 'x'", ("KeyError", False)),
    ("TimeLimitExceeded(30,)", ("TimeLimitExceeded", False)),
    ("UnpickleableExceptionWrapper('myapp.errors', 'BadError', ('a',), \"BadError('a')\")", ("BadError", True)),
    ("", ("unknown", False)),
    (None, ("unknown", False)),
    ("<weird object at 0x1>", ("unknown", False)),
])
def test_exception_class_names(text, expected):
    assert exception_class(text) == expected
