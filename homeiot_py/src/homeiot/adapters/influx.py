"""InfluxDB adapter over the v1 compatibility HTTP API (DESIGN.md §3).

Line protocol goes to ``POST /write`` (``precision=ms``), InfluxQL to ``GET /query`` with
``chunked=true``. That API is served by InfluxDB 1.x, 2.x (token auth, DBRP mapping) and 3 Core
alike, so one client covers all three. Auth modes: none, 1.x user/password (HTTP Basic — never in
the URL, so never in access logs), and token (``Authorization: Token …``).

Errors: :class:`InfluxUnavailableError` (retry), :class:`InfluxAuthError` (fix credentials),
:class:`InfluxPartialWriteError` (some or all lines refused; the offending lines are attached),
:class:`InfluxQueryError` (a statement failed).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import io
import json
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from homeiot.config import InfluxSettings
from homeiot.core.errors import (
    InfluxAuthError,
    InfluxPartialWriteError,
    InfluxQueryError,
    InfluxRejectedError,
    InfluxUnavailableError,
)
from homeiot.core.writes import WriteAnswer

logger = logging.getLogger(__name__)

_UNPARSABLE = re.compile(r"unable to parse '(.*)': [^']*$")
_DROPPED = re.compile(r"dropped=(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class SeriesChunk:
    """One chunk of one series of a query result: ``values`` rows in ``columns`` order."""

    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]


def _error_text(response: httpx.Response) -> str:
    return _answer_text(response.content)


def _answer_text(content: bytes) -> str:
    """The message in an error answer's body (InfluxDB's JSON ``error``, or the text)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode("utf-8", "replace").strip()[:500]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)
    return str(body)


def parse_write_error(text: str) -> tuple[list[str], int | None]:
    """The offending lines quoted in a ``/write`` error, and the ``dropped=`` count if present."""
    lines: list[str] = []
    dropped_match = _DROPPED.search(text)
    dropped = int(dropped_match.group(1)) if dropped_match else None
    body = _DROPPED.sub("", text)
    for segment in body.split("\n"):
        match = _UNPARSABLE.search(segment)
        if match:
            lines.append(match.group(1))
    return lines, dropped


def auth_headers(settings: InfluxSettings) -> dict[str, str]:
    """The request headers for ``settings``' auth mode (the token header for 2.x and 3)."""
    headers = {"User-Agent": "homeiot"}
    if settings.auth == "token":
        headers["Authorization"] = f"Token {settings.token}"
    return headers


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), built once
    per process: loading the CA bundle costs about 0.1 s of CPU, and one archive run opens
    several clients."""
    return httpx.create_ssl_context()


class _ResponseStream(io.RawIOBase):
    """A readable file over an ``http.client`` response, for pyarrow's CSV reader. A read that
    fails (a timeout, the connection broke off mid-answer) raises
    :class:`InfluxUnavailableError`; pyarrow passes it on unchanged."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        try:
            return self._response.readinto(target)
        except TimeoutError as exc:
            raise InfluxUnavailableError(f"InfluxDB timed out during a query: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise InfluxUnavailableError(
                f"InfluxDB connection failed during a query: {exc!r}") from exc


def _raise_for_answer(status: int, text: str, path: str) -> None:
    """The error for an answer with ``status`` >= 400 to a request on ``path``."""
    if status in (401, 403):
        raise InfluxAuthError(f"InfluxDB refused our credentials ({status}): {text}; check "
                              "INFLUXDB_AUTH and its secrets")
    if status >= 500 or status == 429:
        raise InfluxUnavailableError(f"InfluxDB answered {status}: {text}")
    if status == 400 and path.endswith("/query"):
        raise InfluxQueryError(f"query refused: {text}")
    if status == 400 and path.endswith("/write"):
        lines, dropped = parse_write_error(text)
        raise InfluxPartialWriteError(f"InfluxDB refused part of a write: {text}", lines, dropped)
    raise InfluxRejectedError(f"InfluxDB answered {status}: {text}")


def unreachable(exc: httpx.TransportError, url: httpx.URL) -> str:
    """Why no answer came from InfluxDB at ``url``, in words an operator can act on: a name that
    does not resolve, a refused connection, or what httpx said. Names only host and port (the
    URL's query could carry credentials)."""
    where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, socket.gaierror):
            return (f"cannot resolve InfluxDB's host name {url.host!r} (INFLUXDB_URL): "
                    f"{error.strerror or error}")
        if isinstance(error, ConnectionRefusedError):
            return (f"the connection to InfluxDB at {where} was refused: nothing listens there "
                    "(is it running, is INFLUXDB_URL's port right?)")
        todo += [e for e in (error.__cause__, error.__context__, *error.args)
                 if isinstance(e, BaseException)]
    return f"cannot reach InfluxDB at {where}: {exc}"


class InfluxClient:
    """A small synchronous client for one database, reusing one HTTP connection pool."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        auth: httpx.Auth | None = None
        if settings.auth == "password":
            auth = httpx.BasicAuth(settings.username or "", settings.password or "")
        self._http = httpx.Client(base_url=settings.url, headers=auth_headers(settings), auth=auth,
                                  timeout=settings.timeout_s, verify=_tls_context())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise InfluxUnavailableError(f"InfluxDB at {self.settings.url} timed out: {exc}") from exc
        except httpx.TransportError as exc:
            raise InfluxUnavailableError(unreachable(exc, self._http.base_url)) from exc
        self._raise_for_status(response)
        return response

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            _raise_for_answer(response.status_code, _error_text(response),
                              response.request.url.path)

    def _query_params(self, statement: str, chunk_size: int, epoch: str,
                      params: dict[str, str] | None) -> dict[str, str]:
        query_params = {"db": self.settings.database, "q": statement, "chunked": "true",
                        "chunk_size": str(chunk_size), "epoch": epoch}
        if self.settings.retention_policy:
            query_params["rp"] = self.settings.retention_policy
        if params:
            query_params["params"] = json.dumps(params)
        return query_params

    def ping(self) -> str:
        """Check that InfluxDB answers; returns its version (``X-Influxdb-Version``)."""
        response = self._request("GET", "/ping")
        return str(response.headers.get("X-Influxdb-Version", "unknown"))

    def write(self, lines: Sequence[str], *, batch_size: int = 5000) -> int:
        """Write line-protocol ``lines`` (millisecond timestamps) in batches; returns lines sent.

        Each batch is one request; if one fails, the batches before it are stored and the error
        says which lines were refused. Writing the same point again overwrites it.
        """
        params = {"db": self.settings.database, "precision": "ms"}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        for start in range(0, len(lines), batch_size):
            body = "\n".join(lines[start:start + batch_size]).encode("utf-8")
            self._request("POST", "/write", params=params, content=body,
                          headers={"Content-Type": "text/plain; charset=utf-8"})
        return len(lines)

    def write_answer(self, lines: Sequence[str]) -> WriteAnswer:
        """Send ``lines`` in one ``POST /write`` and return InfluxDB's answer as it is — the
        gateway's policy table (:mod:`homeiot.core.writes`) decides what it means. No answer at
        all (a timeout, no connection) is status None."""
        params = {"db": self.settings.database, "precision": "ms"}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        try:
            response = self._http.post("/write", params=params, content="\n".join(lines).encode(),
                                       headers={"Content-Type": "text/plain; charset=utf-8"})
        except httpx.TimeoutException as exc:
            return WriteAnswer(None, f"InfluxDB timed out: {exc}")
        except httpx.TransportError as exc:
            return WriteAnswer(None, unreachable(exc, self._http.base_url))
        if response.status_code < 300:
            return WriteAnswer(response.status_code)
        text = _error_text(response)
        refused = parse_write_error(text)[0] if response.status_code == 400 else ()
        return WriteAnswer(response.status_code, f"{response.status_code}: {text}",
                           tuple(refused))

    def execute(self, statement: str) -> list[dict[str, Any]]:
        """Run an administrative or small InfluxQL statement with ``POST /query``; returns results.

        For ``CREATE DATABASE`` and friends, which InfluxDB 1.x only accepts by POST.
        """
        # InfluxDB reads db from the URL, not from the form body.
        response = self._request("POST", "/query", params={"db": self.settings.database},
                                 data={"q": statement})
        return self._results(response.json(), statement)

    @staticmethod
    def _results(body: Any, statement: str) -> list[dict[str, Any]]:
        if not isinstance(body, dict):
            raise InfluxQueryError(f"unexpected answer to {statement!r}: {body!r:.200}")
        if "error" in body:
            raise InfluxQueryError(f"{statement!r}: {body['error']}")
        results: list[dict[str, Any]] = body.get("results", [])
        for result in results:
            if "error" in result:
                raise InfluxQueryError(f"{statement!r}: {result['error']}")
        return results

    def query(self, statement: str, *, chunk_size: int = 10_000, epoch: str = "ms",
              params: dict[str, str] | None = None) -> Iterator[SeriesChunk]:
        """Stream the result of a read-only InfluxQL statement, chunk by chunk.

        Uses ``chunked=true``: InfluxDB sends one JSON document per chunk of at most
        ``chunk_size`` rows and this iterator parses and yields them one at a time, so the whole
        result is never held in memory. Timestamps are integers in ``epoch`` units. ``params``
        are bound parameters (``$name`` in the statement), which InfluxDB quotes itself.
        """
        query_params = self._query_params(statement, chunk_size, epoch, params)
        try:
            # identity: compressing a large result costs InfluxDB more CPU than the loopback or
            # LAN transfer it saves.
            with self._http.stream("GET", "/query", params=query_params,
                                   headers={"Accept-Encoding": "identity"}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for_status(response)
                # One JSON document per line, each up to a chunk's size: collect the pieces of a
                # line and join them once.
                pieces: list[bytes] = []
                for data in response.iter_bytes():
                    start = 0
                    while (end := data.find(b"\n", start)) != -1:
                        pieces.append(data[start:end])
                        line = b"".join(pieces)
                        pieces.clear()
                        if line.strip():
                            yield from self._chunks(line, statement)
                        start = end + 1
                    if start < len(data):
                        pieces.append(data[start:])
                line = b"".join(pieces)
                if line.strip():
                    yield from self._chunks(line, statement)
        except httpx.TimeoutException as exc:
            raise InfluxUnavailableError(f"InfluxDB timed out during a query: {exc}") from exc
        except httpx.TransportError as exc:
            raise InfluxUnavailableError(f"InfluxDB connection failed during a query: {exc}") from exc

    @contextlib.contextmanager
    def query_csv(self, statement: str, *, chunk_size: int = 10_000, epoch: str = "ms"
                  ) -> Iterator[io.BufferedReader]:
        """The result of a read-only statement as a CSV byte stream (``Accept: application/csv``,
        ``chunked=true``), for a C++ CSV reader: far less CPU than JSON on both sides.

        InfluxDB answers a missing database with an empty CSV body, so the database is checked
        first (JSON), and an ``error`` column in the stream is reported as the query error.

        The stream comes over the standard library's ``http.client`` on its own connection (same
        URL, credentials, TLS context and timeout; no proxy from the environment): decoding the
        chunked body of a day's export took h11, under httpx, about three times the CPU.
        """
        for _ in self.rows("SHOW RETENTION POLICIES"):  # InfluxQueryError: database not found
            break
        query = urllib.parse.urlencode(self._query_params(statement, chunk_size, epoch, None))
        parts = urllib.parse.urlsplit(self.settings.url)
        path = f"{parts.path.rstrip('/')}/query"
        headers = {**auth_headers(self.settings), "Accept": "application/csv",
                   "Accept-Encoding": "identity"}
        if self.settings.auth == "password":
            basic = f"{self.settings.username or ''}:{self.settings.password or ''}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(basic).decode()}"
        connection = (
            http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                        timeout=self.settings.timeout_s, context=_tls_context())
            if parts.scheme == "https" else
            http.client.HTTPConnection(parts.hostname or "", parts.port,
                                       timeout=self.settings.timeout_s))
        try:
            try:
                connection.request("GET", f"{path}?{query}", headers=headers)
                response = connection.getresponse()
                body = response.read() if response.status >= 400 else b""
            except TimeoutError as exc:
                raise InfluxUnavailableError(f"InfluxDB at {self.settings.url} timed out: {exc}"
                                             ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise InfluxUnavailableError(
                    f"cannot reach InfluxDB at {self.settings.url}: {exc!r}") from exc
            if response.status >= 400:
                _raise_for_answer(response.status, _answer_text(body), path)
            # Buffered: read(n) then returns n bytes unless at the end, as pyarrow expects.
            yield io.BufferedReader(_ResponseStream(response), 1 << 20)
        finally:
            connection.close()

    def _chunks(self, line: bytes, statement: str) -> Iterable[SeriesChunk]:
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InfluxQueryError(f"unreadable query chunk for {statement!r}: {exc}") from exc
        for result in self._results(body, statement):
            for series in result.get("series", ()):
                yield SeriesChunk(series.get("name", ""), series.get("tags") or {},
                                  series["columns"], series.get("values") or [])

    def rows(self, statement: str, *, chunk_size: int = 10_000,
             params: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Stream the result as one dict per row (series tags merged in)."""
        for chunk in self.query(statement, chunk_size=chunk_size, params=params):
            for values in chunk.values:
                row = dict(zip(chunk.columns, values, strict=True))
                row.update(chunk.tags)
                yield row
