"""Destinations named by a stdout field: FIFO paths and log URIs, parsed as the Go shim does."""

from __future__ import annotations

import pytest

from shim.stdio.uri import StdioURIError, Target, binary_args, parse


def test_empty_and_plain_paths():
    assert parse("") == Target("null")
    assert parse("/run/containerd/fifo/123/c-stdout") == Target("fifo", "/run/containerd/fifo/123/c-stdout")
    # a path is used as it is: no unescaping, '?' and ':' after the first '/' are not a scheme or query
    assert parse("/tmp/a%20b?x:y") == Target("fifo", "/tmp/a%20b?x:y")


def test_file_uri():
    assert parse("file:///var/log/c.log") == Target("file", "/var/log/c.log")
    assert parse("file:///var/log/with%20space.log") == Target("file", "/var/log/with space.log")
    assert parse("FILE:///x") == Target("file", "/x")


def test_binary_uri_and_its_arguments():
    t = parse("binary:///usr/local/bin/logger?id=abc&verbose&level=debug")
    assert t == Target("binary", "/usr/local/bin/logger", ("id", "abc", "verbose", "", "level", "debug"))
    assert parse("binary:///bin/log").args == ()
    # Go's url.Values keep every value but NewBinaryCmd passes the first only
    assert binary_args("a=1&a=2&b=%2Fx") == ("a", "1", "b", "/x")


def test_host_part_is_ignored_like_gos_url_path():
    assert parse("binary://ignored/usr/bin/logger").path == "/usr/bin/logger"


@pytest.mark.parametrize("value, message", [
    ("foo:///x", "unknown STDIO scheme foo"),
    ("binary://", "has no absolute path"),
    ("file:relative.log", "has no absolute path"),
])
def test_unusable_values(value, message):
    with pytest.raises(StdioURIError, match=message):
        parse(value)


@pytest.mark.parametrize("uri", [
    "binary:///usr/bin/log?a=1&b=%2Fx+y&c&&d=&a=2#frag",
    "binary://host:99/p%C3%A9/x?k%20=v%zz&=empty",
    "binary:///a\tb\r\nc?q=1\n",
    "file:///%E2%82%AC%",
    "file:///x%2",
    "fifo:/no/slashes?x",
    "file://?only=query",
    "binary:///café?ü=%FF",
])
def test_split_and_unquote_as_urllib(uri):
    """Parsed without urllib (kept out of the zygote), with the same results for these."""
    import urllib.parse

    from shim.stdio.uri import _split, _unquote

    parts = urllib.parse.urlsplit(uri)
    assert _split(uri) == (parts.path, parts.query)
    assert _unquote(parts.path) == urllib.parse.unquote(parts.path)
    expected: list[str] = []
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        expected += [key, values[0]]
    assert binary_args(parts.query) == tuple(expected)
