"""Errors as the model codebases do it: every exception class the feed package defines has one root,
``feed.errors.FeedError`` (issue 8), so a caller can catch "anything bookcast raised on purpose"."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import feed
from feed.errors import FeedError, LocalError, RemoteError


def _feed_exceptions() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(feed.__path__, "feed."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_feed_exception_derives_from_feed_error():
    found = _feed_exceptions()
    assert len(found) >= 15, sorted(found)  # the scan saw the package, not an empty list
    stray = sorted(name for name, cls in found.items() if not issubclass(cls, FeedError))
    assert stray == [], f"exceptions outside the FeedError root: {stray}"
    both = sorted(name for name, cls in found.items() if issubclass(cls, LocalError) and issubclass(cls, RemoteError))
    assert both == [], f"an error is either local or remote, never both: {both}"


def test_describe_exception_names_the_class_once():
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import ServiceUnavailableError

    from feed.errors import describe_exception

    unavailable = ServiceUnavailableError(code=503, description="JetStream not ready")
    assert describe_exception(unavailable) == str(unavailable)             # nats-py names it in the message
    assert describe_exception(unavailable).count("ServiceUnavailableError") == 1
    assert describe_exception(NatsTimeout()) == "TimeoutError: nats: timeout"
    assert describe_exception(TimeoutError()) == "TimeoutError"            # no message: the class alone
    assert describe_exception(ValueError("bad seq")) == "ValueError: bad seq"
